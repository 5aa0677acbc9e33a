"""Exceptions raised for problems a user can fix.

Every message names the file, row, gene or option at fault and says what to do.
The CLI prints these without a traceback; the plugin shows them as notifications.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "Cancelled",
    "CohortError",
    "ConfigError",
    "ExpressionError",
    "FeatureFileError",
    "MirrorError",
    "SlideError",
    "SlideResolutionError",
    "TrainingError",
]


class MirrorError(Exception):
    """Base class of all user-facing errors of mirror_model."""


class ConfigError(MirrorError, ValueError):
    """An invalid parameter, preset name or configuration value."""


class SlideError(MirrorError):
    """A slide cannot be opened, has no resolution metadata, or has no tissue."""


class SlideResolutionError(SlideError):
    """A slide has no resolution metadata: its µm per pixel must be given (``mpp=``)."""


class FeatureFileError(MirrorError):
    """A feature file (.h5/.pt) is missing, malformed or from another encoder."""


class ExpressionError(MirrorError):
    """An expression table is malformed or does not match the cohort / bundle."""


class CohortError(MirrorError):
    """A cohort table is malformed (missing columns, duplicate slides, bad paths)."""


class BundleError(MirrorError):
    """A model bundle cannot be loaded (corrupt, truncated, newer format, missing parts)."""


class TrainingError(MirrorError):
    """Training cannot continue (non-finite loss, incompatible checkpoint)."""


class Cancelled(MirrorError):
    """Raised inside long work when the caller asked it to stop."""
