"""Qt widgets of the plugin (imported only when napari opens the widget)."""
