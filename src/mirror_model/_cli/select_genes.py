"""``mirror-train select-genes``: RFECV gene selection fitted inside each fold's training patients.

The folds are those of the trainer (:func:`mirror_model.train.splits.make_splits`, stratified by
subtype, same ``--seed`` default), or read from ``--splits splits.json``. For each fold the
selection and the normalisation are fitted on the fold's inner-training patients only — never
on its validation or test patients — and written, with the fold's patient lists, to one JSON
file. ``--folds 1`` gives one fold holding all patients (inner validation held out).
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort", required=True, metavar="CSV", help="cohort table")
    parser.add_argument(
        "--expression",
        required=True,
        metavar="FILE",
        help="expression table (CSV/TSV/parquet, either orientation)",
    )
    parser.add_argument("--out", required=True, metavar="JSON", help="output file (genes.json)")
    parser.add_argument(
        "--folds",
        type=int,
        default=5,
        metavar="K",
        help="patient-level folds; selection per fold on its training patients "
        "(default 5; 1 = all patients)",
    )
    parser.add_argument(
        "--splits",
        metavar="JSON",
        default=None,
        help="reuse the folds of a splits.json (as written by pretrain) instead of making them",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.15,
        metavar="F",
        help="inner validation share of each fold's non-test patients (default 0.15)",
    )
    parser.add_argument(
        "--curated",
        metavar="FILE",
        default=None,
        help="curated gene list united with the selection (one per line)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=42,
        metavar="S",
        help="seed of the fold split and of RFECV (default 42)",
    )
    parser.add_argument(
        "--max-genes",
        type=int,
        default=None,
        metavar="N",
        help="cap on the RFE-selected genes (curated genes come on top)",
    )
    parser.add_argument("--min-genes", type=int, default=10, metavar="N")
    parser.add_argument(
        "--step",
        type=float,
        default=0.05,
        help="fraction of genes removed per RFE step (default 0.05)",
    )
    parser.add_argument(
        "--inner-folds",
        type=int,
        default=5,
        metavar="K",
        help="RFECV folds inside each training set (default 5)",
    )
    parser.add_argument(
        "--prefilter",
        type=int,
        default=2000,
        metavar="N",
        help="keep the N most variable genes before RFE (0 = no pre-filter; default 2000)",
    )
    parser.add_argument(
        "--orientation",
        choices=["samples x genes", "genes x samples"],
        default=None,
        help="override the detected table orientation",
    )
    from ._options import add_nan_policy_option

    add_nan_policy_option(parser)


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from .._io import atomic_write_text
    from .._progress import TqdmProgress
    from ..cohort import read_cohort
    from ..errors import ConfigError
    from ..expression import read_expression
    from ..genes import fit_preprocessing, read_gene_list
    from ..train.splits import Splits, make_splits

    cohort = read_cohort(args.cohort)
    table = read_expression(
        args.expression, orientation=args.orientation, nan_policy=args.nan_policy
    )
    print(table.describe())
    patients = cohort.patients()
    pids = patients["patient_id"].tolist()
    table.rows_for(pids)  # every patient must have expression; fails early with a clear list
    labels = patients["subtype"].tolist() if "subtype" in patients else [None] * len(pids)
    curated = read_gene_list(args.curated) if args.curated else None
    if args.folds < 1:
        raise ConfigError(f"--folds must be >= 1, got {args.folds}.")
    label_of = dict(zip(pids, labels, strict=True))
    if args.splits:
        splits = Splits.load(args.splits)
        unknown = sorted({p for f in splits.folds for p in f.train + f.val + f.test} - set(pids))
        if unknown:
            raise ConfigError(
                f"{args.splits} names {len(unknown)} patients that are not in "
                f"{args.cohort}: {', '.join(unknown[:10])}."
            )
    else:
        splits = make_splits(
            pids, label_of, n_folds=args.folds, inner_val_fraction=args.val_fraction, seed=args.seed
        )
    params = dict(
        step=args.step,
        cv_folds=args.inner_folds,
        max_genes=args.max_genes,
        min_genes=args.min_genes,
        prefilter_genes=args.prefilter or None,
        seed=args.seed,
    )
    out = {
        "format": "napari-mirror gene selection",
        "version": 1,
        "cohort": str(cohort.path),
        "expression": str(table.path),
        "orientation": table.orientation,
        "n_folds": splits.n_folds,
        "seed": splits.seed,
        "splits": str(args.splits) if args.splits else None,
        "curated": str(args.curated) if args.curated else None,
        "params": params,
        "folds": [],
    }
    with TqdmProgress() as bar:
        for fold in splits.folds:
            k, train, val, test = fold.fold, fold.train, fold.val, fold.test
            pp = fit_preprocessing(table, train, label_of, curated=curated, progress=bar, **params)
            sel = pp.selector
            out["folds"].append(
                {
                    "fold": k,
                    "train_patients": train,
                    "val_patients": val,
                    "test_patients": test,
                    "genes": pp.genes,
                    "method": sel.get("method"),
                    "preprocessing": pp.to_dict(),
                }
            )
            score = max((s for _, s in sel.get("cv_scores", [])), default=float("nan"))
            print(
                f"fold {k}: fitted on {len(train)} training patients (not on {len(val)} "
                f"validation / {len(test)} test) -> "
                f"{len(pp.genes)} genes ({sel.get('method')}, {len(sel.get('rfe_genes', []))} "
                f"by selection + {len(sel.get('curated_added', []))} curated; inner CV "
                f"{args.inner_folds}-fold score {score:.3f})"
            )
            for note in sel.get("notes", []):
                print(f"  note: {note}")
    counts: dict[str, int] = {}
    for f in out["folds"]:
        for g in f["genes"]:
            counts[g] = counts.get(g, 0) + 1
    out["selected_in_all_folds"] = sorted(g for g, c in counts.items() if c == splits.n_folds)
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    sizes = [len(f["genes"]) for f in out["folds"]]
    print(
        f"wrote {args.out}: {splits.n_folds} fold(s), {int(np.min(sizes))}-{int(np.max(sizes))} genes "
        f"per fold, {len(out['selected_in_all_folds'])} selected in every fold"
    )
    return 0
