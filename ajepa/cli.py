"""The `ajepa` command: one subcommand per pipeline stage, plus `embed`, `bench`, `preset`, `gpu-check` and
`params-doc`, `compare`, `ablate`. The only argument parser."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ajepa import __version__
from ajepa.choices import Encoder, names
from ajepa.errors import AjepaError, Interrupted
from ajepa.interrupt import StopSignals

# Each command imports its own module when it is chosen (below): `ajepa --version`, `check`, `preset` and
# the params tools then start without loading torch (seconds), and the pipeline tools (dvc, dvclive,
# snakemake, matplotlib: an optional extra) only when a stage needs them.
# what `pip install -e '.[pipeline]'` adds to the library: a stage that needs one names the remedy
PIPELINE_MODULES = {"dvc", "dvclive", "snakemake", "matplotlib", "ruamel"}


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _add_embed(sub) -> None:
    s = sub.add_parser("embed", help="scene embeddings of audio files with an exported encoder (resumable)")
    s.add_argument("inputs", nargs="+", metavar="DIR_OR_FILE",
                   help="audio files, and folders searched recursively for .wav .flac .ogg .mp3 .aif .aiff")
    s.add_argument("--out", required=True, metavar="FILE.npz",
                   help="embeddings and paths; FILE.csv (index) and FILE.rejects.csv (unreadable clips) beside it")
    s.add_argument("--encoder", default="models/pretrain", metavar="PATH",
                   help="an export folder, or a folder of them (default: models/pretrain)")
    s.add_argument("--which", choices=names(Encoder), default=None,
                   help="the encoder of a folder of exports (default: downstream.encoder of --params if that "
                        "file exists, else context)")
    s.add_argument("--batch-size", type=int, default=16, help="clips per encoder call (default 16)")
    s.add_argument("--save-every", type=int, default=256, metavar="CLIPS",
                   help="keep finished embeddings for a resume every this many clips (default 256)")
    s.add_argument("--device", default="auto",
                   help="auto (the GPU when CUDA works, else the CPU), cuda[:N] (stops in one line without a usable "
                        "GPU) or cpu")


def _add_ablate(sub) -> None:
    s = sub.add_parser("ablate", help="the paper's ablations (masking; fine-tuning's regularized masking) as queued "
                                      "DVC experiments over seeds, and their table (docs/experiments.md)")
    s.add_argument("--preset", default=None, metavar="NAME",
                   help="run the ablations on a preset's values (given as -S overrides; params.yaml is left as it "
                        "is): default none, the embedded default of params.yaml; `paper` on GPUs")
    s.add_argument("--seeds", type=_at_least_one, default=3, help="seeds 0..N-1 per variant (default 3)")
    s.add_argument("--variants", default=None, metavar="NAMES",
                   help="comma-separated variant names or groups (masking, fine-tuning); default all")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="a params.yaml value for every run (repeatable)")
    do = s.add_mutually_exclusive_group()
    do.add_argument("--dry-run", action="store_true", help="print the dvc commands; queue nothing")
    do.add_argument("--run", action="store_true", help="queue, run them with one worker and wait, then the table")
    do.add_argument("--table", action="store_true", help="the finished runs' table into results/ablation.md and "
                                                          "docs/experiments.md")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ajepa",
        description="A-JEPA pipeline stages. Each reads its section of params.yaml; dvc.yaml and the "
                    "Snakefile call these same commands.")
    p.add_argument("--version", action="version", version=f"ajepa {__version__}")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="STAGE", help="the stage or tool to run")

    sub.add_parser("check", help="validate every key of params.yaml (the stage every other stage depends on)")

    s = sub.add_parser("prepare", help="generate or fetch a dataset and write its manifest")
    s.add_argument("dataset", help="dataset name under `datasets` in params.yaml: synth, words, esc50, spc2, "
                                   "spc1, as20k, as2m, vox1")
    s.add_argument("--source", metavar="PATH", default=None,
                   help="a local archive, or a directory of downloaded files or extracted copies, instead of "
                        "downloading (overrides datasets.DATASET.prepare.source)")

    s = sub.add_parser("features", help="log-mel fbank features into memory-mapped shards")
    s.add_argument("dataset", help="a dataset of pipeline.datasets whose manifest `ajepa prepare` wrote")

    s = sub.add_parser("pool", help="list what pretraining takes from one dataset's features")
    s.add_argument("dataset", help="a dataset of pretrain.datasets")

    s = sub.add_parser("pretrain", help="A-JEPA self-supervised pretraining (resumes; starts one process per GPU "
                                        "itself, or runs under torchrun)")
    s.add_argument("--stop-after", type=_at_least_one, default=None, metavar="STEPS",
                   help="stop after this many steps, keeping a resumable checkpoint (time-boxed jobs)")

    s = sub.add_parser("linear", help="frozen-encoder linear evaluation on a benchmark (plus baselines)")
    s.add_argument("benchmark", help="a benchmark with a recipe under `finetune` in params.yaml (e.g. synth)")

    s = sub.add_parser("finetune", help="fine-tune the pretrained encoder on a benchmark (resumes)")
    s.add_argument("benchmark", help="a benchmark with a recipe under `finetune` in params.yaml (e.g. synth)")

    s = sub.add_parser("report", help="results/report.md and results/summary.json from every stage's metrics")

    s = sub.add_parser("preset", help="merge a preset (presets/NAME.yaml) into params.yaml, listing what changed")
    s.add_argument("name", help="preset name (smoke, paper) or path to a preset .yaml file")
    s.add_argument("--dry-run", action="store_true", help="list the changes without writing params.yaml")

    _add_embed(sub)

    sub.add_parser("params-doc", help="print docs/parameters.md: every params.yaml key, its type, value and meaning")
    s = sub.add_parser("compare", help="the experiments of `dvc exp show`: params changed and each benchmark's "
                                       "headline metrics, one row per experiment")
    s.add_argument("--width", type=int, default=120, help="table width in characters (default 120)")
    _add_ablate(sub)
    s = sub.add_parser("params-format", help="rewrite params.yaml in the layout `dvc exp run -S` writes (lists one "
                                             "item per line, null empty), so a -S run changes only its keys' lines")
    s.add_argument("--check", action="store_true", help="write nothing; exit 1 when params.yaml is not in that layout")

    _add_bench(sub)
    return p


def _add_bench(sub) -> None:
    s = sub.add_parser("bench", help="measure throughput of a stage")
    bench = s.add_subparsers(dest="bench", required=True, metavar="WHAT", help="what to measure")
    _machine_parsers(sub, bench)
    b = bench.add_parser("features", help="decode + resample + fbank + write of 10 s 44.1 kHz clips")
    b.add_argument("--clips", type=int, default=200, help="clips per measurement (default 200)")
    b.add_argument("--workers", type=int, default=0, help="processes for the parallel run (0 = one per core)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    b = bench.add_parser("probe", help="linear probe on synthetic embeddings on disk: peak RSS and seconds per size")
    b.add_argument("--clips", type=int, nargs="+", default=[2000, 20000], help="clip counts (default 2000 20000)")
    b.add_argument("--width", type=int, default=1024, help="embedding width (default 1024)")
    b.add_argument("--block-mb", type=float, default=16, help="linear.block_mb for the run (default 16)")
    b.add_argument("--max-iter", type=int, default=20, help="L-BFGS iterations (default 20)")
    b.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_bench_scale(bench)
    b = bench.add_parser("layers", help="the linear probe at every depth of the pretrained encoder and of its random "
                                        "init, beside the fbank baseline (where a missed bar's information went)")
    b.add_argument("benchmark", help="a benchmark with prepared features (e.g. words)")
    b.add_argument("--encoder", default=None, choices=["context", "target"],
                   help="which pretrained encoder (default: downstream.encoder)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    b = bench.add_parser("pretrain", help="A-JEPA training steps: samples/s, model FLOP/s, matmul peak, MFU")
    b.add_argument("--encoder", default="config", choices=["config", "tiny", "small", "base", "large"],
                   help="encoder size (default: pretrain.encoder in params)")
    b.add_argument("--target-length", type=int, default=None, metavar="FRAMES",
                   help="input frames (default: the pretraining dataset's target_length; 1024 = AudioSet)")
    b.add_argument("--batch", type=int, default=None, help="batch size (default: pretrain.optim.batch_size)")
    b.add_argument("--predictor-dim", type=int, default=None, help="predictor width (default: params)")
    b.add_argument("--predictor-depth", type=int, default=None, help="predictor depth (default: params)")
    b.add_argument("--steps", type=int, default=8, help="timed steps per masking mode (default 8)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    b.add_argument("--device", default="auto",
                   help="auto (the GPU when CUDA works, else the CPU), cuda[:N] (stops in one line without a usable "
                        "GPU) or cpu")
    b.add_argument("--compile", action="store_true", help="torch.compile the blocks (compile time reported apart)")
    b.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in backward")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_bench_scale(bench) -> None:
    b = bench.add_parser("scale", help="AudioSet-2M's shard count at tiny cost: every stage as a job would run it "
                                       "(open-file and memory limits), peak RSS, open files, seconds, projected to 2 M")
    b.add_argument("--clips", type=_at_least_one, nargs="+", default=[195, 1950], metavar="N",
                   help="rehearsal sizes, one clip per shard (default 195 1950: a tenth and all of AS-2M's shard "
                        "count; two sizes or more fit the projection's line)")
    b.add_argument("--nofile", type=_at_least_one, default=1024, help="RLIMIT_NOFILE, soft and hard (default 1024)")
    b.add_argument("--memory-gb", type=float, default=8.0, help="RLIMIT_AS of every stage process (default 8)")
    b.add_argument("--readonly", choices=["auto", "on", "off"], default="auto",
                   help="every mount but the run folder read-only in a mount namespace (auto: where `unshare` may)")
    b.add_argument("--folder", default=None, metavar="DIR",
                   help="keep the runs in DIR/clips-N (default: a temporary folder, removed)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _machine_parsers(sub, bench) -> None:
    """`gpu-check` and `bench loader`: what a machine can do for the paper's setup."""
    s = sub.add_parser("gpu-check", help="one JSON object: paper-size bf16 steps (MFU, memory against the GPU's), "
                                         "micro_batch auto, loader clips/s, open-file limit, 300 steps, kill and "
                                         "resume, probes, fine-tuning, DDP and torchrun on every GPU (`make gpu-check`)")
    s.add_argument("--cpu", action="store_true",
                   help="run a miniature of the checks on the CPU (as AJEPA_GPU_CHECK_CPU=1); without it, no usable "
                        "GPU stops the check in one line")
    b = bench.add_parser("loader", help="pretraining and fine-tuning data loaders: clips/s per worker, workers to "
                                        "feed 8 H100s")
    b.add_argument("--store", default=None, metavar="DIR",
                   help="a feature store to read (default: a temporary one of --clips generated clips)")
    b.add_argument("--clips", type=int, default=1024, help="clips in the temporary store (default 1024)")
    b.add_argument("--frames", type=int, default=1024, help="frames per clip in the temporary store (default 1024)")
    b.add_argument("--batch", type=int, default=128, help="clips per batch (default 128)")
    b.add_argument("--steps", type=int, default=8, help="timed batches per worker count (default 8)")
    b.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2; 0: "
                                                                          "in the process that trains)")
    b.add_argument("--benchmark", default=None,
                   help="whose fine-tuning recipe (sampling, mixup) to time (default: the first of pipeline.benchmarks)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # a file name the terminal's encoding cannot show (PYTHONIOENCODING=ascii, a C locale) is printed
        # escaped rather than failing the command after its work is done
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    signals = StopSignals().install()  # SIGTERM too stops with a message, running the `finally`s on the way out
    try:
        if args.command in TOOLS:
            return _run_tool(args)
        summary = _run_stage(args)
        if summary:
            print(summary)
        return 0
    except AjepaError as e:
        return _fail(f"ajepa {args.command}: error: {e}", 2)
    except Interrupted as e:
        return _fail(f"ajepa {args.command}: {e}", 128 + e.signum)
    except ModuleNotFoundError as e:
        if e.name.split(".")[0] not in PIPELINE_MODULES:
            raise
        return _fail(f"ajepa {args.command}: error: no module {e.name}: install the pipeline tools "
                     "(pip install -e '.[pipeline]')", 2)
    except KeyboardInterrupt:
        return _fail(f"ajepa {args.command}: interrupted", 130)
    finally:
        signals.restore()


# the commands that are no pipeline stage
TOOLS = ("bench", "preset", "embed", "gpu-check", "params-doc", "params-format", "compare", "ablate")


def _run_tool(args) -> int:
    """A command of TOOLS: prints its output, returns the exit status."""
    if args.command == "bench":
        from ajepa.tools import bench  # bench pretrain reads --params itself
        print(bench.run(args))
    elif args.command == "preset":
        from ajepa.tools import presets
        changes = presets.apply_preset(args.name, args.params, dry_run=args.dry_run)
        print(presets.describe(args.name, args.params, changes, args.dry_run))
    elif args.command == "embed":
        from ajepa.tools import embed  # --which may read --params itself
        print(embed.run(args))
    elif args.command == "gpu-check":
        from ajepa.tools import gpucheck
        r = gpucheck.gpu_check(args.params, cpu=args.cpu)
        print(json.dumps(r))
        print(gpucheck.summary_line(r), file=sys.stderr)
        return 0 if r["ok"] else 1
    elif args.command == "compare":
        from ajepa.tools import compare
        print(compare.run(args.width))
    elif args.command == "ablate":
        from ajepa.tools import ablate
        print(ablate.run(args))
    elif args.command == "params-format":
        from ajepa.tools import paramfile
        changed = paramfile.format_file(args.params, check=args.check)
        print(f"{args.params}: {'not ' if changed and args.check else ''}in the layout `dvc exp run -S` writes"
              f"{' (rewritten)' if changed and not args.check else ''}")
        return 1 if changed and args.check else 0
    else:
        from ajepa.tools import paramdoc
        print(paramdoc.render(args.params), end="")
    return 0


def _run_stage(args) -> str:
    """A pipeline stage, with params.yaml read (and checked) first; returns its summary."""
    from ajepa.config import load_params
    params = load_params(args.params)
    _check_project_folder(Path(args.params))
    if args.command == "check":
        from ajepa.stages import check
        return check.run(params)
    if args.command == "prepare":
        from ajepa.stages import prepare
        return prepare.run(params, args.dataset, source=args.source)
    if args.command == "features":
        from ajepa.stages import features
        return features.run(params, args.dataset)
    if args.command == "pool":
        from ajepa.stages import pool
        return pool.run(params, args.dataset)
    if args.command == "pretrain":
        from ajepa.stages import pretrain
        return pretrain.run(params, stop_after=args.stop_after)
    if args.command == "linear":
        from ajepa.stages import linear
        return linear.run(params, args.benchmark)
    if args.command == "finetune":
        from ajepa.stages import finetune
        return finetune.run(params, args.benchmark)
    from ajepa.stages import report
    return report.run(params)


def _check_project_folder(params_file: Path) -> None:
    """Stages read and write data/, models/ and results/ under the current folder: a params file from
    another project (cd elsewhere, --params there) would scatter half a project in the wrong place."""
    here = Path.cwd().resolve()
    if not params_file.resolve().is_relative_to(here):
        raise AjepaError(f"--params {params_file}: not under the current folder {here}, where this stage reads "
                         f"and writes data/, models/ and results/; run it from the project's folder "
                         f"(cd {params_file.resolve().parent})")


def _fail(message: str, code: int) -> int:
    from ajepa.progress import close_bars
    close_bars()
    print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
