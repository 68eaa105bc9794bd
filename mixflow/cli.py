"""The ``mixflow`` command: ``run`` a pipeline spec, write ``shards``."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from mixflow.data.text_domains import MACHINE_DOMAINS
from mixflow.errors import ConfigError, MixflowError

# A core install (``pip install mixflow``) is the mixing library only: the commands need the
# pipeline extra, and say so when one of its modules is missing instead of an ImportError traceback.
PIPELINE_MODULES = ("ray", "nvidia", "cv2", "pyarrow", "pydantic", "yaml", "rich", "PIL", "sklearn")
try:
    from rich.console import Console
    from rich.markup import escape

    from mixflow.config import parse_bytes
except ModuleNotFoundError as exc:
    if (exc.name or "").split(".")[0] not in PIPELINE_MODULES:
        raise
    _MISSING: ModuleNotFoundError | None = exc
else:
    _MISSING = None


def _needs_pipeline_extra(command: str, exc: ModuleNotFoundError) -> int:
    print(f"mixflow {command}: needs the pipeline extra (module {exc.name!r} is not installed): "
          f"pip install 'mixflow[pipeline]' (in a checkout: pip install -e '.[pipeline]')", file=sys.stderr)
    return 2


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_stop_the_run(received: list[int]):
    """While the block runs, the first SIGINT or SIGTERM raises KeyboardInterrupt in the main thread
    (Ray's blocking calls turn whatever a handler raises into KeyboardInterrupt anyway), so the
    pipeline's stop path runs on the way out; later signals are recorded and ignored, so that
    stop is not cut short. ``received`` collects the signal numbers. Once stopping, the tasks the
    pipeline abandons end in errors nobody reads: Ray is told not to print them."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handler(signum, frame):
        received.append(signum)
        if len(received) == 1:
            os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
            raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _cmd_run(args: argparse.Namespace, console: Console) -> int:
    """Run the spec. On SIGINT/SIGTERM: the pipeline stops its producers, fails its channels, tears
    down the ranks' process groups and kills every actor it created; an embedded Ray this command
    started is shut down (a cluster it joined, left); the exit status is 128 + the signal number."""
    import ray

    from mixflow.config import load_spec
    from mixflow.runtime.ray_session import ensure_ray

    # Relative paths are the driver's: resolved here, before the spec ships to actors on other nodes.
    spec = load_spec(args.spec, args.set + ([f"runtime.address={args.address}"] if args.address else []),
                     base=Path.cwd())
    for warning in _check_inputs(spec, args):  # before Ray starts: a missing shard directory or state is one line
        console.print(f"[yellow]warning:[/] {escape(warning)}", markup=True, highlight=False)
    connects = not ray.is_initialized()  # this command connects this process to Ray
    embedded = ensure_ray(spec.runtime.address, spec.runtime.runtime_env)  # before the handlers: ray.init sets its own SIGTERM handler
    received: list[int] = []
    with _signals_stop_the_run(received):
        try:
            return _run_spec(spec, args, console)
        except KeyboardInterrupt:
            pass  # the pipeline has stopped itself on the way out
        finally:
            if connects:
                ray.shutdown()
    signum = received[0] if received else signal.SIGINT
    where = "embedded Ray shut down" if embedded else "disconnected from Ray" if connects else "Ray left running"
    console.print(f"[red]stopped by {signal.Signals(signum).name}[/]: producers stopped, channels closed, "
                  f"trainer ranks left their process groups, pipeline actors killed; {where}",
                  markup=True, highlight=False)
    return 128 + signum


def _check_inputs(spec, args: argparse.Namespace) -> list[str]:
    """Refuse, naming the option or field, what ``run`` would only find missing after starting Ray:
    the ``--resume`` state file, the spec's shard directory (unless a demo set is built into it).
    Returns warnings: ranks or readers that the shard layout leaves without data."""
    from pathlib import Path

    from mixflow.errors import DataError

    if args.resume and not Path(args.resume).is_file():
        raise MixflowError(f"--resume: no such pipeline state file: {args.resume}")
    if "://" in spec.data.shards:  # object storage: the listing (in the pipeline) names what is missing
        return _check_shards(spec, args) if spec.kind == "image" else []
    shards = Path(spec.data.shards)
    if spec.kind == "image" and not spec.data.demo:
        if not shards.is_dir():
            raise DataError(f"data.shards: shard directory {shards} does not exist (write shards with "
                            "`mixflow shards`, or set data.demo)")
        if not any(shards.glob("*.tar")) and not any(shards.glob("*.idx")):
            raise DataError(f"data.shards: no *.tar shards in {shards}")
    warnings = _check_shards(spec, args) if spec.kind == "image" and any(shards.glob("*.tar")) else []
    if spec.kind == "tokens" and not spec.data.machine_domains and not Path(spec.data.shards).is_dir():
        raise DataError(f"data.shards: token shard directory {spec.data.shards} does not exist "
                        "(write shards with `mixflow shards --text ...`, or set data.machine_domains)")
    return warnings


def _resume_error(exc: ValueError, state: str) -> MixflowError:
    message = str(exc)
    if message.startswith("resume_from: "):
        message = f"--resume {state}: " + message.removeprefix("resume_from: ")
    elif message.startswith("stop_at: "):
        message = "--stop-at: " + message.removeprefix("stop_at: ")
    return MixflowError(message)


def _check_shards(spec, args: argparse.Namespace) -> list[str]:
    """The ``--resume`` state checked against the image shards' epoch plan before Ray starts (the
    pipeline checks it again, and checks the shards against the spec: ``data.num_classes``, ranks
    or readers left without data)."""
    from mixflow.data.bad_samples import BadSamplePolicy
    from mixflow.data.listing import list_shards
    from mixflow.runtime import image_checkpoint as ckpt

    if args.resume:
        shards = list_shards(spec.data.shards, BadSamplePolicy(spec.on_error), spec.data.store)
        try:
            ckpt.check_resumable(ckpt.load_state(args.resume), spec, shards)
        except ValueError as exc:
            raise _resume_error(exc, args.resume) from None
    return []


def _run_spec(spec, args: argparse.Namespace, console: Console) -> int:
    if spec.trainer.entrypoint is not None:
        console.print(f"running {escape(str(spec.trainer.entrypoint))} on {spec.trainer.ranks} rank(s)")
    if spec.kind == "tokens" and (args.resume or args.stop_at):
        raise ConfigError([("--resume/--stop-at", "only image pipelines (kind: image) resume from the command line")])
    if spec.kind == "tokens":
        from mixflow.runtime.token_pipeline import TokenPipeline

        summary = TokenPipeline(spec, console, show_progress=not args.no_progress).run()
        summary.render(console)
        console.print(f"summary written to {escape(str(spec.run_path / 'summary.json'))}")
        return 0
    from mixflow.runtime.image_pipeline import ImagePipeline

    try:
        pipe = ImagePipeline(spec, console, show_progress=not args.no_progress, resume_from=args.resume)
        summary = pipe.run(stop_at=args.stop_at)
    except ValueError as exc:  # a state that does not fit the spec, a stop point outside the run
        raise _resume_error(exc, args.resume) from None
    summary.render(console)
    console.print(f"summary written to {escape(str(spec.run_path / 'summary.json'))}")
    if args.stop_at:
        console.print(f"stopped at epoch {args.stop_at[0]} step {args.stop_at[1]}; resume with "
                      f"--resume {escape(str(spec.run_path / 'pipeline_state.json'))}")
    return 0 if summary.exactly_once else 3


def _cmd_serve(args: argparse.Namespace, console: Console) -> int:
    """Start a detached pipeline that ranks attach to by name. On a cluster (``--address`` or
    ``RAY_ADDRESS``) the command returns once it is up; on the embedded local Ray it starts, it
    stays in the foreground until ``mixflow stop NAME`` (or Ctrl-C, which stops the pipeline)."""
    import time

    import ray

    from mixflow.runtime.pipeline_handle import running_pipelines, start

    pipe = start(args.spec, args.name, overrides=args.set, address=args.address, detached=True)
    address = ray.get_runtime_context().gcs_address
    embedded = not (args.address or os.environ.get("RAY_ADDRESS") or pipe.spec.runtime.address)
    console.print(f"pipeline [bold]{escape(pipe.name)}[/] ({pipe.kind}, {pipe.world_size} ranks, {pipe.epochs} epoch(s)) "
                  f"is serving on Ray at {address}", highlight=False, soft_wrap=True)
    # Other processes joining a cluster with token authentication must say so (Ray reads the token
    # from ~/.ray/auth_token, but only asks for it with RAY_AUTH_MODE=token).
    auth = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else ""
    console.print(f"attach each rank:  {auth}RAY_ADDRESS={address} python your_train.py   # feed = mixflow.feed("
                  f"{pipe.name!r}), rank from RANK/WORLD_SIZE (torchrun) or Ray Train", highlight=False, markup=False,
                  soft_wrap=True)
    console.print(f"stop it:           {auth}mixflow stop {pipe.name} --address {address}", highlight=False,
                  markup=False, soft_wrap=True)
    if not embedded:
        return 0
    console.print("(embedded Ray: serving until stopped)")
    try:
        while pipe.name in running_pipelines():
            time.sleep(1.0)
    except KeyboardInterrupt:
        summary = pipe.close()
        summary.render(console)
        return 130
    return 0


def _cmd_stop(args: argparse.Namespace, console: Console) -> int:
    """Stop a served pipeline and print its summary: the ledger verdict of every epoch."""
    from mixflow.runtime.pipeline_handle import connect

    pipe = connect(args.name, args.address)
    summary = pipe.close()
    summary.render(console)
    console.print(f"summary written to {escape(str(pipe.spec.run_path / 'summary.json'))}")
    return 0 if getattr(summary, "exactly_once", True) else 3


def _epoch_step(value: str) -> tuple[int, int]:
    epoch, sep, step = value.partition(":")
    if not sep or not epoch.isdigit() or not step.isdigit():
        raise argparse.ArgumentTypeError(f"expected EPOCH:STEP (two integers >= 0), got {value!r}")
    return int(epoch), int(step)


def _cmd_token_shards(args: argparse.Namespace, console: Console, shown: str) -> int:
    from mixflow.data.text_domains import machine_documents
    from mixflow.data.token_shard_writer import read_text_inputs, write_domain_splits

    sources: dict[str, list] = {}
    if args.text_domains:
        names = MACHINE_DOMAINS if "machine" in args.text_domains else dict.fromkeys(args.text_domains)
        for name in names:
            sources[name] = machine_documents(name, max_bytes=parse_bytes(args.domain_bytes))
    for name, path in args.text or []:
        sources.setdefault(name, []).extend(read_text_inputs(path, text_field=args.jsonl_field))
    size = _shard_size(args.shard_size) or 32 * 2**20
    for name, docs in sources.items():
        for split, manifest in write_domain_splits(docs, args.out, name, args.val_fraction, max_bytes=size).items():
            console.print(f"{escape(name)}/{split}: {manifest.num_docs} documents, {manifest.num_tokens} tokens in "
                          f"{len(manifest.shards)} Parquet shards (+ manifest.json) for {escape(f'{shown}/{name}/{split}')}")
    return 0


def _shard_size(value: str | None) -> int | None:
    """``--shard-size`` in bytes (None when not given); a bad value is a one-line error."""
    if value is None:
        return None
    try:
        size = parse_bytes(value)
    except ValueError as exc:
        raise MixflowError(f"--shard-size: {exc}") from None
    if size <= 0:
        raise MixflowError(f"--shard-size: must be > 0, got {value!r}")
    return size


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _name_path(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH_OR_GLOB, got {value!r}")
    return name, path


def _cmd_shards(args: argparse.Namespace, console: Console) -> int:
    """Write shards into ``--out``; a URL (``s3://bucket/prefix``): written into a local temporary
    directory first, then uploaded (shards and indexes, then manifests and ``classes.json``)."""
    if "://" not in args.out:
        return _write_shards(args, console)
    import json
    import tempfile

    from mixflow.data.object_store import PROCESS_STATS, check_storage_options, redact, upload_tree

    try:
        options = json.loads(args.storage_options or "{}")
        check_storage_options(options)
    except ValueError as exc:
        raise MixflowError(f"--storage-options: {exc}") from None
    url = args.out.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="mixflow-shards-") as staging:
        code = _write_shards(argparse.Namespace(**{**vars(args), "out": staging}), console, shown=redact(url))
        written = upload_tree(staging, url, options, PROCESS_STATS)
    retried = f", {PROCESS_STATS.retries} request(s) retried" if PROCESS_STATS.retries else ""
    console.print(f"uploaded {len(written)} objects to {escape(redact(url))}{retried}", highlight=False)
    return code


def _write_shards(args: argparse.Namespace, console: Console, shown: str | None = None) -> int:
    from mixflow.data.demo_sets import build_demo
    from mixflow.data.image_folder import shards_from_folder

    if shown is None:
        shown = str(args.out)
    if args.text_domains or args.text:
        return _cmd_token_shards(args, console, shown)
    size = _shard_size(args.shard_size)
    if args.demo:
        kwargs = {"num_samples": args.num_samples} if args.demo == "photos" and args.num_samples else {}
        writer = build_demo(args.demo, args.out, max_bytes=size, **kwargs)
    else:
        writer = shards_from_folder(args.from_folder, args.out, max_bytes=size or 64 * 2**20, prefix=args.prefix,
                                    seed=args.seed, on_error=args.on_error)
    console.print(f"wrote {writer.total_samples} samples into {len(writer.paths)} shards (+ .idx) for {escape(shown)}")
    for record in getattr(writer, "skipped", []):
        console.print(f"[yellow]skipped[/] {escape(record.reason)}", markup=True, highlight=False)
    if getattr(writer, "skipped", []):
        console.print(f"{len(writer.skipped)} unreadable image(s) skipped", highlight=False)
    if len(writer.paths) < 2:
        console.print(f"[yellow]note:[/] {len(writer.paths)} shard: a run reads whole shards, so only one reader "
                      "(of one rank) gets data; pass a smaller --shard-size for at least one shard per reader",
                      markup=True, highlight=False)
    return 0


def _cmd_preview(args: argparse.Namespace, console: Console) -> int:
    from mixflow.preview import render_preview

    shown = render_preview(args.source, args.out, rows=args.rows, cols=args.cols, seed=args.seed,
                           method=args.method, overrides=args.set)
    console.print(f"{len(shown.tiles)} samples mixed with {shown.method} drawn into {escape(str(shown.path))} "
                  f"({shown.size[0]}x{shown.size[1]} px)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mixflow {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline spec (YAML)")
    run.add_argument("spec", help="path to a pipeline spec, e.g. pipelines/digits_mixup.yaml")
    run.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a spec field, e.g. --set trainer.epochs=1 (repeatable)")
    run.add_argument("--no-progress", action="store_true", help="no live progress display")
    run.add_argument("--address", help="join this Ray cluster (auto, HOST:PORT or ray://HOST:PORT; default: "
                                       "the spec's runtime.address, else RAY_ADDRESS, else an embedded local Ray)")
    run.add_argument("--resume", metavar="STATE", help="continue from a pipeline_state.json saved by a stopped run "
                     "(image pipelines; other ranks/readers_per_rank re-split the rest of the epoch)")
    run.add_argument("--stop-at", type=_epoch_step, metavar="EPOCH:STEP",
                     help="stop once every rank consumed STEP batches of EPOCH, saving the state and checkpoints")
    run.set_defaults(func=_cmd_run)
    serve = sub.add_parser("serve", help="start a detached pipeline that your ranks attach to by name "
                                         "(mixflow.feed(NAME), e.g. under torchrun)")
    serve.add_argument("spec", help="path to a pipeline spec")
    serve.add_argument("--name", help="the name ranks attach by (default: the spec's name)")
    serve.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a spec field")
    serve.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS; none: an embedded local Ray, "
                                         "served in the foreground)")
    serve.set_defaults(func=_cmd_serve)
    stop = sub.add_parser("stop", help="stop a served pipeline and print its ledger verdict")
    stop.add_argument("name", help="the pipeline's name")
    stop.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS)")
    stop.set_defaults(func=_cmd_stop)
    shards = sub.add_parser("shards", help="write WebDataset tar shards with DALI index files (images) "
                                           "or Parquet token shards (text)")
    source = shards.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", metavar="DIR", help="image folder, one sub-folder per class")
    source.add_argument("--demo", choices=["digits", "photos"], help="build a demo set from bundled photos/digits")
    source.add_argument("--text-domains", nargs="+", choices=["machine", *MACHINE_DOMAINS],
                        help="token shards of real text domains from files on this machine ('machine': all)")
    source.add_argument("--text", nargs="+", type=_name_path, metavar="NAME=PATH_OR_GLOB",
                        help="token shards of domain NAME from text files, a directory, a glob or *.jsonl")
    shards.add_argument("--out", required=True, help="output directory, or a URL (s3://bucket/prefix, gs://...): "
                                                     "shards, indexes and manifests are uploaded there")
    shards.add_argument("--storage-options", metavar="JSON",
                        help='fsspec options for a URL --out, e.g. \'{"client_kwargs": {"endpoint_url": '
                             '"http://127.0.0.1:9000"}}\' (credentials come from the environment, never here)')
    shards.add_argument("--shard-size", help="target shard size, e.g. 64MiB")
    shards.add_argument("--prefix", default="train", help="shard file name prefix (--from-folder)")
    shards.add_argument("--seed", type=int, default=0,
                        help="seed of the file order (--from-folder): classes are interleaved across shards")
    shards.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                        help="an unreadable image (--from-folder): stop naming it, or skip and count it")
    shards.add_argument("--num-samples", type=int, help="samples in the photos demo (default 1024)")
    shards.add_argument("--jsonl-field", default="text", help="text field of *.jsonl inputs (--text)")
    shards.add_argument("--domain-bytes", default="4MiB", help="text cap per machine domain (--text-domains)")
    shards.add_argument("--val-fraction", type=float, default=0.1,
                        help="documents held out per text domain as validation (0: none)")
    shards.set_defaults(func=_cmd_shards)
    preview = sub.add_parser("preview", help="draw a PNG grid of mixed samples with their label weights")
    preview.add_argument("source", metavar="SPEC_OR_SHARDS", help="a pipeline spec (YAML) or a shard directory")
    preview.add_argument("--method", help="mixing method (replaces the spec's mix section; shards default "
                                          "mixup_cutmix)")
    preview.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                         help="override a spec field, e.g. --set mix.alpha=0.4 --set decode.size=[64,64]")
    preview.add_argument("--out", default="preview.png", help="PNG to write (default preview.png)")
    preview.add_argument("--rows", type=int, default=4)
    preview.add_argument("--cols", type=int, default=4)
    preview.add_argument("--seed", type=int, help="seed for the shuffle, crops and mixing (default: the spec's)")
    preview.set_defaults(func=_cmd_preview)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if _MISSING is not None:
        return _needs_pipeline_extra(args.command, _MISSING)
    console = Console()
    try:
        return args.func(args, console)
    except ModuleNotFoundError as exc:  # e.g. ray or DALI, imported by the command
        if (exc.name or "").split(".")[0] not in PIPELINE_MODULES:
            raise
        return _needs_pipeline_extra(args.command, exc)
    except MixflowError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
