"""The one harness: plan every (case, implementation, point, pinning, repetition),
run each in a fresh pinned process pair, and report.

Repetitions of different implementations are interleaved (case, point,
pinning, repetition, then implementation), so a burst of noise from the rest
of the machine lands on all of them rather than on one. Nothing here times
anything: timing happens in ``runner`` inside the fresh processes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .core import CPU_PINNINGS, Case, Job, Pinning, Point, percentile
from .machine import REPO_ROOT, git_commit, machine_info
from .native import build_ceiling
from .registry import CASES, IMPLEMENTATIONS, Impl, implementations_for, missing_requirement
from .report import RESULTS_DIR, describe_subset, render_markdown, update_readme, write_results
from .runner import run_job

__all__ = ["Broker", "Options", "main", "parse_args", "run"]

# On top of the timing budget: process start, connection set-up, the server's start.
JOB_SLACK = 60.0
# A floor for the transfer rate used to bound a repetition with huge messages.
SLOWEST_BYTES_PER_SECOND = 20 * 1024 * 1024


@dataclass
class Options:
    quick: bool = False
    cases: list[str] = field(default_factory=lambda: list(CASES))
    impls: list[str] | None = None
    pinnings: list[Pinning] = field(default_factory=lambda: list(CPU_PINNINGS))
    repetitions: int | None = None
    out_dir: Path = RESULTS_DIR
    plot: bool = True
    update_readme: bool = False
    progress: bool | None = None
    # What a run that is not the full set was limited to (None: every case,
    # implementation and pinning): it is reported as such and never published.
    subset: dict[str, Any] | None = None


@dataclass
class Cell:
    """Every repetition of one implementation at one point and pinning: one record."""

    case: Case
    impl: Impl
    point: Point
    pinning: Pinning
    cpus: tuple[int, int] | None
    skip_reason: str | None = None
    # Set when the run could not measure the cell at all (the broker did not
    # start): a failure, unlike a skip, which is an absent optional peer.
    failure: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


class Broker:
    """alpc's broker daemon for the whole run, in a fresh 0700 runtime dir."""

    def __init__(self) -> None:
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="alpc-bench-"))
        os.chmod(self.runtime_dir, 0o700)
        self._log = tempfile.TemporaryFile()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        ready_r, ready_w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "alpc", "--runtime-dir", str(self.runtime_dir), "--log-level", "WARNING",
                 "broker", "--ready-fd", str(ready_w)],
                pass_fds=(ready_w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
                cwd=REPO_ROOT,
            )
            os.close(ready_w)
            ready_w = -1
            if not select.select([ready_r], [], [], timeout)[0] or not os.read(ready_r, 64).startswith(b"READY"):
                self._log.seek(0)
                said = self._log.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"the alpc broker did not start: {said}")
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)

    def pin(self, cpu: int) -> None:
        """Put every thread of the broker on ``cpu``, next to the server it serves."""
        if self._proc is None:
            return
        for tid in os.listdir(f"/proc/{self._proc.pid}/task"):
            try:
                os.sched_setaffinity(int(tid), {cpu})
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._log.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def _cpus(pinning: Pinning) -> tuple[tuple[int, int] | None, str | None]:
    """(client CPU, server CPU) for a pinning, or why it cannot be done here."""
    allowed = sorted(os.sched_getaffinity(0))
    if pinning == "same":
        return (allowed[0], allowed[0]), None
    if len(allowed) < 2:
        return None, "only one CPU is available"
    return (allowed[1], allowed[0]), None


def plan(options: Options) -> list[Cell]:
    cells: list[Cell] = []
    native_error: str | None = None
    native_checked = False
    for name in options.cases:
        case = CASES[name]
        impls = [i for i in implementations_for(name) if options.impls is None or i.name in options.impls]
        for point in case.points(options.quick):
            for pinning in (p for p in case.pinnings if p in options.pinnings):
                cpus, cpu_problem = _cpus(pinning)
                for impl in impls:
                    reason = cpu_problem or missing_requirement(impl)
                    if reason is None and impl.native is not None:
                        if not native_checked:
                            native_checked = True
                            try:
                                build_ceiling()
                            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                                native_error = f"the C ceiling could not be built: {exc}"
                        reason = native_error
                    cells.append(Cell(case, impl, point, pinning, cpus, reason))
    return cells


def _job_timeout(job: Job) -> float:
    timing = job.timing
    case = CASES[job.case]
    # A one-way sample moves a whole batch.
    per_sample = case.batch_for(Point(job.size, job.connections)) if case.batch_bytes is not None else 1
    transfers = (timing.warmup + timing.min_iterations + 1) * per_sample
    return JOB_SLACK + 2 * (timing.time_cap + timing.warmup_cap) + transfers * job.size / SLOWEST_BYTES_PER_SECOND


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


def _remove_leftover_names(tag: str) -> list[str]:
    """Remove /dev/shm names a killed repetition left behind; returns them."""
    left = [n for n in os.listdir("/dev/shm") if tag in n]
    for name in left:
        try:
            os.unlink(f"/dev/shm/{name}")
        except FileNotFoundError:
            pass
    return left


def _kill_group(pid: int) -> None:
    """Kill a runner and everything it started (its children also die with it).

    Called before the runner is reaped, so its group id cannot have been reused.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_repetition(ctx: Any, job: Job) -> dict[str, Any]:
    """Run one job in a fresh process from the forkserver; never raises for the job's own failures."""
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(target=run_job, args=(job, writer), name=f"bench-{job.case}-{job.impl}")
    process.start()
    writer.close()
    timeout = _job_timeout(job)
    result: dict[str, Any]
    try:
        if reader.poll(timeout):
            result = reader.recv()
        else:
            result = {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    except EOFError:
        result = {"status": "error", "reason": f"the runner died: {_tail(Path(job.workdir) / 'stderr.log')}"}
    except BaseException:
        # Ctrl-C reaches the harness only: the runner has its own process group.
        _kill_group(process.pid)
        raise
    finally:
        reader.close()
    if result["status"] == "ok":
        process.join(10)
    if process.is_alive() or result["status"] != "ok":
        _kill_group(process.pid)
    process.join(30)
    if process.is_alive():
        raise RuntimeError(f"the runner of {job.case}/{job.impl} survived SIGKILL (pid {process.pid})")
    leaked = _remove_leftover_names(job.tag)
    if leaked and result["status"] == "ok":
        result = {"status": "error", "reason": f"left /dev/shm names behind: {leaked}"}
    return result


def _record(cell: Cell, meta: dict[str, Any]) -> dict[str, Any]:
    case = cell.case
    record: dict[str, Any] = {
        "case": case.name,
        "title": case.title,
        "implementation": cell.impl.name,
        "kind": cell.impl.kind,
        "size": cell.point.size,
        "connections": cell.point.connections,
        "pinning": cell.pinning,
        "cpus": {"client": cell.cpus[0], "server": cell.cpus[1]} if cell.cpus else None,
        "unit": case.unit,
        "lower_is_better": case.lower_is_better,
        "status": "ok",
        "reason": None,
        "median": None,
        "p99": None,
        "min": None,
        "max": None,
        "repetitions": 0,
        "samples": 0,
        # Wall time of all repetitions, start-up included: what the case costs the run.
        "seconds": round(float(sum(r.get("seconds", 0.0) for r in cell.results)), 2),
        "extras": {},
        "machine": meta["machine"],
        "commit": meta["commit"],
        "timestamp": meta["generated"],
    }
    if cell.skip_reason is not None:
        record.update(status="skipped", reason=cell.skip_reason)
        return record
    if cell.failure is not None:
        record.update(status="error", reason=cell.failure)
        return record
    ok = [r for r in cell.results if r["status"] == "ok"]
    failed = [r for r in cell.results if r["status"] != "ok"]
    if failed:
        record.update(status="error", reason=f"{len(failed)} of {len(cell.results)} repetitions failed: "
                                             f"{failed[0]['reason']}")
    if not ok:
        return record
    pooled = [s for r in ok for s in r["samples"]]

    # For rates a high time is a low rate: the tail is always taken on the raw samples.
    def convert(raw: float) -> float:
        return case.convert(raw, cell.point)

    per_rep = [convert(percentile(r["samples"], 50)) for r in ok]
    extras: dict[str, float] = {}
    for key in sorted({k for r in ok for k in r["extras"]}):
        extras[key] = percentile([r["extras"][key] for r in ok if key in r["extras"]], 50)
    if case.raw_unit == "ns":
        extras["median_ns"] = percentile(pooled, 50)
        extras["p99_ns"] = percentile(pooled, 99)
    record.update(
        median=convert(percentile(pooled, 50)),
        p99=convert(percentile(pooled, 99)),
        min=min(per_rep),
        max=max(per_rep),
        repetitions=len(ok),
        samples=len(pooled),
        extras=extras,
    )
    return record


class _Progress:
    """Shows the repetition running now; silent unless a terminal is watching."""

    def __init__(self, bar: Any = None, task: Any = None) -> None:
        self._bar = bar
        self._task = task

    def start(self, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=description)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[_Progress]:
    """A rich progress bar on stderr when enabled, a silent stand-in otherwise."""
    if not enabled:
        yield _Progress()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), refresh_per_second=4) as bar:
        yield _Progress(bar, bar.add_task("starting", total=total))


def _want_progress(options: Options) -> bool:
    if options.progress is not None:
        return options.progress
    if not sys.stderr.isatty():
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _jobs(cells: list[Cell], options: Options, broker: Broker | None,
          binary: Path | None) -> Iterator[tuple[Cell, Job]]:
    """Interleaved: for each case, point and pinning, repetition r of every implementation in turn."""
    groups: dict[tuple[str, Point, str], list[Cell]] = {}
    for cell in cells:
        if cell.skip_reason is None and cell.failure is None:
            groups.setdefault((cell.case.name, cell.point, cell.pinning), []).append(cell)
    for group in groups.values():
        case = group[0].case
        timing = case.timing(options.quick, group[0].point)
        repetitions = options.repetitions or timing.repetitions
        for repetition in range(repetitions):
            for cell in group:
                assert cell.cpus is not None
                tag = uuid.uuid4().hex[:12]
                yield cell, Job(
                    case=case.name, impl=cell.impl.name, size=cell.point.size, connections=cell.point.connections,
                    pinning=cell.pinning, client_cpu=cell.cpus[0], server_cpu=cell.cpus[1],
                    repetition=repetition, timing=timing, workdir=tempfile.mkdtemp(prefix="alpcb-"), tag=tag,
                    alpc_runtime_dir=str(broker.runtime_dir) if broker else None,
                    native_binary=str(binary) if binary else None,
                )


def _count_jobs(cells: list[Cell], options: Options) -> int:
    total = 0
    for cell in cells:
        if cell.skip_reason is None and cell.failure is None:
            timing = cell.case.timing(options.quick, cell.point)
            total += options.repetitions or timing.repetitions
    return total


def run(options: Options) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    started = time.monotonic()
    meta: dict[str, Any] = {
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine_info(),
        "quick": options.quick,
        "subset": options.subset,
        # Other work on the machine shows up in every figure; say how much there was.
        "load_average": {"start": round(os.getloadavg()[0], 2)},
    }
    cells = plan(options)
    runnable = [c for c in cells if c.skip_reason is None]
    binary = build_ceiling() if any(c.impl.native for c in runnable) else None
    broker: Broker | None = None
    if any(c.impl.kind == "alpc" for c in runnable):
        broker = Broker()
        try:
            broker.start()
        except RuntimeError as exc:
            broker.stop()
            broker = None
            for cell in runnable:
                if cell.impl.kind == "alpc":
                    cell.failure = str(exc)
    ctx = multiprocessing.get_context("forkserver")
    # Imported once in the forkserver, so each fresh process starts in milliseconds.
    # pyzmq is safe to import before a fork (libzmq starts threads only with a
    # Context); grpc is not, so each process that uses it imports it itself.
    ctx.set_forkserver_preload(["alpc", "benchmarks.registry", "benchmarks.runner", "multiprocessing.shared_memory",
                                "zmq"])
    try:
        with _progress(_want_progress(options), _count_jobs(cells, options)) as progress:
            for cell, job in _jobs(cells, options, broker, binary):
                progress.start(f"{job.case} {job.impl} {cell.point.label(cell.case)} {job.pinning} "
                               f"#{job.repetition + 1}")
                if broker is not None and cell.impl.kind == "alpc":
                    broker.pin(job.server_cpu)
                began = time.monotonic()
                try:
                    result = run_repetition(ctx, job)
                finally:
                    shutil.rmtree(job.workdir, ignore_errors=True)
                result["seconds"] = time.monotonic() - began
                cell.results.append(result)
                progress.finish()
    finally:
        if broker is not None:
            broker.stop()
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    meta["load_average"]["end"] = round(os.getloadavg()[0], 2)
    return meta, [_record(cell, meta) for cell in cells]


def parse_args(argv: Sequence[str] | None, cases: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="Measure alpc against its peers; see benchmarks/README.md.")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer sizes, repetitions and time")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only this case (repeatable)")
    parser.add_argument("--impl", action="append", choices=sorted(IMPLEMENTATIONS),
                        help="only this implementation (repeatable)")
    parser.add_argument("--pinning", action="append", choices=CPU_PINNINGS, help="only this pinning (repeatable)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per point (default: per case)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where latest.json/.md/.png go (default: benchmarks/results; results/quick for --quick "
                             "and results/partial for a run limited by --case/--impl/--pinning/--reps, so "
                             "neither replaces the published results)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    parser.add_argument("--update-readme", action="store_true", help="copy the summary table into README.md")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: when stderr is a terminal)")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.update_readme and args.quick:
        parser.error("--update-readme publishes a full run; a --quick run is a smoke check")
    subset = _subset(args, cases)
    if args.update_readme and subset is not None:
        parser.error("--update-readme publishes a full run; this run is limited to " + describe_subset(subset))
    return Options(
        quick=args.quick,
        cases=args.case or list(cases or CASES),
        impls=args.impl,
        pinnings=args.pinning or list(CPU_PINNINGS),
        repetitions=args.reps,
        out_dir=args.out or _default_out_dir(args.quick, subset),
        plot=not args.no_plot,
        update_readme=args.update_readme,
        progress=args.progress,
        subset=subset,
    )


def _subset(args: argparse.Namespace, cases: Sequence[str] | None) -> dict[str, Any] | None:
    """What the command line limited the run to, or None for the full run."""
    chosen = args.case or (list(cases) if cases is not None and set(cases) != set(CASES) else None)
    subset = {"cases": chosen, "impls": args.impl, "pinnings": args.pinning, "repetitions": args.reps}
    return {key: value for key, value in subset.items() if value} or None


def _default_out_dir(quick: bool, subset: dict[str, Any] | None) -> Path:
    """A smoke run and a subset run never replace the published results (results/latest.*)."""
    if quick:
        return RESULTS_DIR / "quick"
    return RESULTS_DIR / "partial" if subset is not None else RESULTS_DIR


def _plot(options: Options, meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    if not options.plot:
        return "plot: not drawn (--no-plot)"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "plot: skipped, matplotlib is not installed; pip install -e '.[bench]'"
    from .plot import plot_results

    path = plot_results(records, options.out_dir / "latest.png", f"{meta['generated']}, commit {meta['commit']}")
    return f"plot: {path}" if path else "plot: nothing to draw (the throughput case did not run)"


def main(argv: Sequence[str] | None = None, cases: Sequence[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv, cases)
    meta, records = run(options)
    json_path, md_path = write_results(options.out_dir, meta, records)
    print(render_markdown(meta, records, full=False))
    print(f"results: {json_path}, {md_path} (every implementation)")
    print(_plot(options, meta, records))
    if options.update_readme:
        update_readme(REPO_ROOT / "README.md", meta, records)
        print(f"updated {REPO_ROOT / 'README.md'}")
    errors = [r for r in records if r["status"] == "error"]
    if errors:
        print(f"{len(errors)} measurement(s) failed; see the 'Not measured' list above", file=sys.stderr)
        return 1
    return 0
