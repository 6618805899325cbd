"""The one measuring harness every benchmark uses: process trees, repetitions, machine facts, result files.

Why one harness: every figure in benchmarks/results/ has to mean the same thing. So

* a measured command runs as its own process (`run_command`), and a thread samples the VmRSS and
  CPU time of that process *and every descendant* (Dask nannies and workers, Ray's raylet and
  workers, DataLoader processes, nnU-Net's pools) from /proc every 20 ms (`TreeSampler`). The
  peak of the tree's summed RSS is what a user's machine must hold; it counts pages shared by
  forked processes once per process (like `top`), so it errs on the high side.
* CPU seconds are taken two ways and the larger kept: the child's rusage (wait4: the child plus
  the descendants it waited for) and the sampled per-process user+system time (which also sees
  descendants that were never waited for, e.g. Ray workers). On a shared machine CPU seconds
  are steadier than wall seconds, so both are reported.
* `measure` repeats a command after warm-up runs and reports the median with min/max and the
  interquartile range, so a noisy neighbour shows up as spread instead of a wrong figure.
* every result records the machine (cores, memory, CPU model, GPU, load average before/after,
  library versions), because the development machine is shared and has 2 cores.
* `write_results` writes `<name>.json`, `<name>.md` and `<name>.png` atomically into
  benchmarks/results/.

Command line (one command, repeated):

    .venv/bin/python benchmarks/harness.py --name sleep --repeats 3 --warmup 1 -- python -c "..."

A measured command may print one JSON object as its last stdout line: it lands in `Run.output`
and its numeric fields get the same median/spread summary as the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# where result files go; SEGPIPE_BENCH_RESULTS redirects every script (tests, trial runs)
RESULTS = Path(os.environ.get("SEGPIPE_BENCH_RESULTS", REPO / "benchmarks" / "results"))
SHARED = Path(os.environ.get("SEGPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
# nnU-Net's reference environment (venv/, raw/, preprocessed/) for the side-by-side rows
NNUNET_REF = Path(os.environ.get("SEGPIPE_NNUNET_REF", REPO.parent / "nnunet_ref"))
MIB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
if str(REPO) not in sys.path:  # `pipeline` (plotting) when the package is not installed
    sys.path.append(str(REPO))


# ---------------------------------------------------------------- /proc readers


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, ValueError):  # gone, or not ours to read
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat[stat.rfind(")") + 2:].split()


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it has gone); statm is the cheapest file that has it."""
    statm = _read(f"/proc/{pid}/statm")
    if not statm:
        return 0
    parts = statm.split()
    return int(parts[1]) * PAGE if len(parts) > 1 else 0


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU time of one process, all its threads (None if it has gone)."""
    f = _stat_fields(pid)
    if f is None or len(f) < 13:
        return None
    return (int(f[11]) + int(f[12])) / CLOCK_TICKS


def _start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot: tells a process from a later one that reuses its pid."""
    f = _stat_fields(pid)
    return int(f[19]) if f and len(f) > 19 else None


def _command_name(pid: int) -> str:
    return (_read(f"/proc/{pid}/comm") or "?").strip()


def process_tree(root: int) -> list[int]:
    """`root` and every process below it, from the parent ids in /proc/*/stat (one scan, ~3 ms)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [root]
    for entry in entries:
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is None or len(f) < 2:
            continue
        children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class TreeSampler:
    """Samples RSS and CPU time of `root` and all its descendants in a thread.

    RSS is read every `interval` seconds from the processes known so far; the tree itself is
    rescanned every `rescan` seconds (a full /proc scan costs a few ms, too much to do 50 times a
    second on 2 cores). Kept: the peak of the summed RSS, the peak of each process, the peak of
    the root, the first sample (baseline) and, per process, the last CPU time seen. When `root` is
    this process, the sampler thread's own CPU time is subtracted from `cpu_seconds`.
    """

    def __init__(self, root: int | None = None, interval: float = 0.02, rescan: float = 0.1,
                 from_birth: bool = False):
        self.root = os.getpid() if root is None else root
        self.from_birth = from_birth  # count CPU of processes present at the start from their birth (a fresh child)
        self.interval, self.rescan = interval, rescan
        self.peak_tree = 0
        self.peak_root = 0
        self.baseline_tree: int | None = None
        self.peak_per_pid: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.start_times: dict[int, int | None] = {}
        self.samples = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._own_cpu = 0.0
        self._pids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._started = False

    # -- sampling
    def _scan(self) -> None:
        self._pids = process_tree(self.root)
        for pid in self._pids:
            if pid not in self.start_times:
                self.start_times[pid] = _start_time(pid)
                self.names[pid] = _command_name(pid)
                # processes that exist when sampling starts count from now; new ones from their birth
                cpu = cpu_seconds(pid)
                self._cpu_start[pid] = (cpu or 0.0) if not (self._started or self.from_birth) else 0.0

    def _sample(self) -> None:
        total = 0
        for pid in self._pids:
            rss = rss_bytes(pid)
            if rss == 0:
                continue
            total += rss
            if rss > self.peak_per_pid.get(pid, 0):
                self.peak_per_pid[pid] = rss
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self._cpu_last[pid] = cpu
        if self.baseline_tree is None:
            self.baseline_tree = total
        self.peak_tree = max(self.peak_tree, total)
        self.peak_root = max(self.peak_root, self.peak_per_pid.get(self.root, 0))
        self.samples += 1

    def _run(self) -> None:
        start = time.thread_time()
        last_scan = 0.0
        while True:
            now = time.monotonic()
            if now - last_scan >= self.rescan:
                self._scan()
                last_scan = now
            self._sample()
            self._own_cpu = time.thread_time() - start
            if self._stop.wait(self.interval):
                break
        self._sample()
        self._own_cpu = time.thread_time() - start

    # -- results
    @property
    def cpu_seconds(self) -> float:
        used = sum(last - self._cpu_start.get(pid, 0.0) for pid, last in self._cpu_last.items())
        if self.root == os.getpid():
            used -= self._own_cpu
        return max(0.0, used)

    @property
    def processes(self) -> int:
        return len(self.start_times)

    def peak_mib(self, pid: int) -> float:
        return self.peak_per_pid.get(pid, 0) / MIB

    def start(self) -> TreeSampler:
        self._scan()
        self._started = True
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> TreeSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Clock:
    """Wall and CPU seconds (all threads of this process) of a block: `with Clock() as c: ...; c.wall, c.cpu`."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


# ---------------------------------------------------------------- the machine


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _meminfo_gib(key: str) -> float | None:
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def _cpu_model() -> str:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """NVIDIA GPUs by nvidia-smi; else torch.cuda when torch is already imported (never imported here)."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            names = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
            if out.returncode == 0 and names:
                return names
        except (OSError, subprocess.SubprocessError):
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_available():
                return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def _versions(names: Iterable[str]) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def machine_info() -> dict:
    """Facts that decide what a timing means; call once before and pass `load_after` at the end."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": _cpu_model(), "cores": cores, "cpu_count": os.cpu_count(),
        "memory_gib": _meminfo_gib("MemTotal"), "memory_available_gib": _meminfo_gib("MemAvailable"),
        "gpus": gpu_names(), "platform": platform.platform(), "python": platform.python_version(),
        "versions": _versions(("torch", "numpy", "dask", "distributed", "zarr", "ray", "nnunetv2")),
        "load_before": load_average(),
    }


def finish_machine(machine: dict) -> dict:
    """The machine record with the load average at the end added."""
    return {**machine, "load_after": load_average()}


def machine_line(machine: Mapping) -> str:
    """One readable line: cores, CPU, memory, GPU, load average before -> after."""
    gpu = ", ".join(machine.get("gpus") or []) or "no GPU"
    load = f"load average {_fmt_load(machine.get('load_before'))}"
    if machine.get("load_after"):
        load += f" -> {_fmt_load(machine.get('load_after'))}"
    return (f"{machine.get('cores')} cores ({machine.get('cpu_model')}), {machine.get('memory_gib')} GiB RAM, {gpu}; "
            f"{load} (1/5/15 min; the machine is shared, so compare rows of one run, not across runs); "
            f"{machine.get('date', '')}")


def _fmt_load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "?"


# ---------------------------------------------------------------- running one command


@dataclass
class Run:
    """One execution of a command: its time, CPU, memory and (optional) JSON output."""

    cmd: list[str]
    pid: int
    returncode: int | None
    wall_s: float
    cpu_s: float  # max of the two below
    cpu_rusage_s: float  # wait4 of the child: itself + the descendants it waited for
    cpu_sampled_s: float  # sampled user+system of every process seen in the tree
    peak_rss_tree_mib: float  # peak of the summed VmRSS of the whole tree
    peak_rss_root_mib: float  # the command's own process
    max_rss_single_mib: float  # kernel's ru_maxrss: the largest single process (not sampled, exact)
    processes: int  # processes seen in the tree
    samples: int
    timed_out: bool = False
    output: dict | None = None  # the last JSON object line of stdout
    stdout_tail: str = ""
    stderr_tail: str = ""
    left_running: list[str] = field(default_factory=list)  # descendants still alive after the command (ended)
    top_processes: list[dict] = field(default_factory=list)  # the largest processes by peak RSS

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def error(self) -> str:
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s"
        tail = (self.stderr_tail.strip().splitlines() or self.stdout_tail.strip().splitlines() or ["no output"])[-1]
        return f"exit {self.returncode}: {tail[:300]}"

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("wall_s", "cpu_s", "cpu_rusage_s", "cpu_sampled_s", "peak_rss_tree_mib", "peak_rss_root_mib",
                  "max_rss_single_mib"):
            d[k] = round(d[k], 3)
        return d


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    return None


def _pump(stream, sink: list[str], echo) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line)
        if echo is not None:
            echo.write(line)
            echo.flush()
    stream.close()


def _end_processes(pids: Iterable[tuple[int, int | None]], grace: float = 3.0) -> list[str]:
    """SIGTERM then SIGKILL the given (pid, start time) pairs that are still the same live processes."""
    alive = []
    for pid, started in pids:
        if started is not None and _start_time(pid) == started:
            state = (_stat_fields(pid) or ["?"])[0]
            if state != "Z":
                alive.append((pid, started))
    names = [f"{pid} {_command_name(pid)}" for pid, _ in alive]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, started in alive:
            if _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_start_time(p) == s and (_stat_fields(p) or ["Z"])[0] != "Z"
                                                   for p, s in alive):
            time.sleep(0.05)
    return names


def run_command(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                timeout: float | None = None, interval: float = 0.02, echo: bool = False,
                end_leftovers: bool = True) -> Run:
    """Run `cmd` as a child process in its own session; sample its whole tree until it exits.

    `echo` streams the child's stdout/stderr through while capturing them. On timeout the child's
    process group and every descendant seen are ended. Descendants still alive after the child
    exits (a leaked worker) are listed in `left_running` and ended unless `end_leftovers` is False.
    """
    cmd = [str(c) for c in cmd]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(env) if env is not None else None, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    sampler = TreeSampler(proc.pid, interval=interval, from_birth=True).start()
    out_lines: list[str] = []
    err_lines: list[str] = []
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, out_lines, sys.stdout if echo else None), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, err_lines, sys.stderr if echo else None), daemon=True)]
    for t in pumps:
        t.start()
    timed_out = False
    rusage = None
    status = None
    try:
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if timeout is not None and time.perf_counter() - start > timeout:
                timed_out = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
                _end_processes(list(sampler.start_times.items()))
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
    except BaseException:  # Ctrl-C: take the whole tree down with us
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        _end_processes(list(sampler.start_times.items()))
        sampler.stop()
        raise
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status) if status is not None else None
    sampler.stop()
    leftovers = [(pid, st) for pid, st in sampler.start_times.items() if pid != proc.pid]
    left = _end_processes(leftovers) if end_leftovers else [
        f"{pid} {_command_name(pid)}" for pid, st in leftovers if st is not None and _start_time(pid) == st]
    for t in pumps:
        t.join(timeout=5)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_rusage = ((rusage.ru_utime + rusage.ru_stime) if rusage is not None else
                  (children_after.ru_utime + children_after.ru_stime - children_before.ru_utime - children_before.ru_stime))
    stdout, stderr = "".join(out_lines), "".join(err_lines)
    top = sorted(sampler.peak_per_pid.items(), key=lambda kv: -kv[1])[:8]
    return Run(
        cmd=cmd, pid=proc.pid, returncode=proc.returncode, wall_s=wall, cpu_s=max(cpu_rusage, sampler.cpu_seconds),
        cpu_rusage_s=cpu_rusage, cpu_sampled_s=sampler.cpu_seconds, peak_rss_tree_mib=sampler.peak_tree / MIB,
        peak_rss_root_mib=sampler.peak_root / MIB,
        max_rss_single_mib=(rusage.ru_maxrss / 1024 if rusage is not None else 0.0),
        processes=sampler.processes, samples=sampler.samples, timed_out=timed_out, output=_last_json(stdout),
        stdout_tail=stdout[-4000:], stderr_tail=stderr[-4000:], left_running=left,
        top_processes=[{"pid": p, "name": sampler.names.get(p, "?"), "peak_rss_mib": round(b / MIB, 1)} for p, b in top],
    )


# ---------------------------------------------------------------- repetitions and statistics


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and interquartile range (inclusive quartiles) of some measurements."""
    vals = sorted(float(v) for v in values if v is not None and math.isfinite(float(v)))
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None}
    q1, q3 = (statistics.quantiles(vals, n=4, method="inclusive")[::2] if len(vals) > 1 else (vals[0], vals[0]))
    r = lambda x: round(x, 4)  # noqa: E731
    return {"n": len(vals), "median": r(statistics.median(vals)), "min": r(vals[0]), "max": r(vals[-1]),
            "q1": r(q1), "q3": r(q3)}


def fmt_spread(s: Mapping | None, digits: int = 2, unit: str = "") -> str:
    """'12.3 (11.9-13.0)' for a spread dict; one value without a range when n == 1."""
    if not s or s.get("median") is None:
        return "–"
    med = f"{s['median']:.{digits}f}{unit}"
    if s.get("n", 1) > 1 and s["min"] != s["max"]:
        return f"{med} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"
    return med


@dataclass
class Measurement:
    """A command run `len(runs)` times after `len(warmup)` discarded warm-up runs."""

    name: str
    cmd: list[str]
    warmup: list[Run]
    runs: list[Run]

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    def stats(self) -> dict:
        good = [r for r in self.runs if r.ok]
        out = {k: spread([getattr(r, k) for r in good])
               for k in ("wall_s", "cpu_s", "peak_rss_tree_mib", "peak_rss_root_mib", "max_rss_single_mib")}
        keys = sorted({k for r in good if r.output for k, v in r.output.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if keys:
            out["output"] = {k: spread([r.output.get(k) for r in good if r.output]) for k in keys}
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "cmd": self.cmd, "ok": self.ok, "stats": self.stats(),
                "runs": [r.to_json() for r in self.runs], "warmup": [r.to_json() for r in self.warmup]}


def measure(name: str, cmd: Sequence[str], *, repeats: int = 3, warmup: int = 1, stop_on_failure: bool = True,
            **kwargs) -> Measurement:
    """`warmup` discarded runs (page cache, imports, compilation caches), then `repeats` measured runs."""
    warm, runs = [], []
    for _ in range(warmup):
        warm.append(run_command(cmd, **kwargs))
        if not warm[-1].ok and stop_on_failure:
            return Measurement(name, list(map(str, cmd)), warm, [])
    for _ in range(repeats):
        runs.append(run_command(cmd, **kwargs))
        if not runs[-1].ok and stop_on_failure:
            break
    return Measurement(name, list(map(str, cmd)), warm, runs)


# ---------------------------------------------------------------- result files


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_json"):
        return _jsonable(obj.to_json())
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return obj


def write_results(name: str, result: dict, markdown: str, plot: Callable | None = None,
                  out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """`<name>.json` (result + machine), `<name>.md` and, with `plot(fig_axes_factory)`, `<name>.png`.

    `plot` receives `new_figure(width, height, nrows=1, ncols=1) -> (fig, axes)` and returns the
    figure it drew, so each script lays out its own panels. Each file is written under a temporary
    name and renamed. A failing plot is reported on stderr and never loses the JSON and markdown.
    """
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result)
    result.setdefault("benchmark", name)
    if not isinstance(result.get("machine"), dict):
        result["machine"] = finish_machine(machine_info())
    elif "load_after" not in result["machine"]:
        result["machine"] = finish_machine(result["machine"])
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    _atomic_write(paths["json"], json.dumps(_jsonable(result), indent=2) + "\n")
    _atomic_write(paths["md"], markdown if markdown.endswith("\n") else markdown + "\n")
    if plot is not None:
        try:
            from pipeline.plotting import new_figure, save_figure

            fig = plot(new_figure)
            if fig is not None:
                paths["png"] = save_figure(fig, out / f"{name}.png")
        except Exception as exc:  # noqa: BLE001 - a figure is never worth the numbers
            print(f"warning: could not plot {name}.png: {type(exc).__name__}: {exc}", file=sys.stderr)
    return paths


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; None prints as an en dash."""
    cell = lambda v: "–" if v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def bar_panel(ax, labels: Sequence[str], values: Sequence[float | None], *, ylabel: str, title: str = "",
              low: Sequence[float | None] | None = None, high: Sequence[float | None] | None = None,
              colors: Sequence[str] | None = None, annotate: bool = True) -> None:
    """A bar chart on `ax`; `low`/`high` (same length) draw the spread as error bars."""
    xs = list(range(len(labels)))
    vals = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
    ax.bar(xs, vals, color=colors or None)
    if low is not None and high is not None:
        err = [[max(0.0, v - (lo if lo is not None else v)) for v, lo in zip(vals, low)],
               [max(0.0, (hi if hi is not None else v) - v) for v, hi in zip(vals, high)]]
        ax.errorbar(xs, vals, yerr=err, fmt="none", ecolor="black", capsize=3, linewidth=1)
    if annotate:
        for x, v in zip(xs, values):
            if v is not None and math.isfinite(v):
                ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)


def python_env(extra_pythonpath: str | os.PathLike | None = None, **extra: str) -> dict[str, str]:
    """The current environment with the repository on PYTHONPATH (benchmarks import `pipeline`)."""
    paths = [str(REPO)] + ([str(extra_pythonpath)] if extra_pythonpath else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def subset_dataset(source: str | os.PathLike, case_ids: Sequence[str], dest: str | os.PathLike) -> Path:
    """A Decathlon-layout dataset folder holding only `case_ids` of `source`, dataset.json rewritten.

    Lets a command-line tool (`segpipe preprocess`, `segpipe predict`) see the same few cases a
    benchmark measures in-process. Files are hard-linked where the file system allows, else copied
    (symlinks would not do: the pipeline refuses links that point outside the dataset folder).
    """
    src, dst = Path(source), Path(dest)
    meta = json.loads((src / "dataset.json").read_text())
    wanted = set(case_ids)
    entries = []
    for entry in meta.get("training", []):
        case = Path(entry["image"]).name.split(".nii")[0]
        if case not in wanted:
            continue
        for key in ("image", "label"):
            target = dst / entry[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.link((src / entry[key]).resolve(), target)
                except OSError:
                    shutil.copyfile(src / entry[key], target)
        entries.append(entry)
    missing = wanted - {Path(e["image"]).name.split(".nii")[0] for e in entries}
    if missing:
        raise ValueError(f"{src} has no training case(s) {sorted(missing)[:5]}")
    meta.update(training=entries, numTraining=len(entries))
    _atomic_write(dst / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return dst


# ---------------------------------------------------------------- command line


def _short(cmd: Sequence[str], limit: int = 160) -> str:
    import shlex

    text = " ".join(shlex.quote(c) for c in cmd).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _markdown(name: str, m: Measurement, machine: dict) -> str:
    s = m.stats()
    rows = [("wall s", fmt_spread(s["wall_s"])), ("CPU s", fmt_spread(s["cpu_s"])),
            ("peak RSS of the process tree MiB", fmt_spread(s["peak_rss_tree_mib"], 0)),
            ("peak RSS of the command MiB", fmt_spread(s["peak_rss_root_mib"], 0)),
            ("largest single process (ru_maxrss) MiB", fmt_spread(s["max_rss_single_mib"], 0))]
    rows += [(f"output: {k}", fmt_spread(v, 4)) for k, v in s.get("output", {}).items()]
    return "\n".join([f"# {name}", "", f"`{_short(m.cmd)}`: {len(m.runs)} run(s) after {len(m.warmup)} warm-up; "
                      "median (min-max).", "", f"Machine: {machine_line(machine)}", "",
                      md_table(["measure", "median (min-max)"], rows)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s --name NAME [--repeats N] [--warmup N] -- COMMAND ...")
    parser.add_argument("--name", required=True, help="result files <out>/<name>.{json,md,png}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("no command given (put it after --)")
    machine = machine_info()
    m = measure(args.name, cmd, repeats=args.repeats, warmup=args.warmup, timeout=args.timeout)
    machine = finish_machine(machine)
    s = m.stats()

    def plot(new_figure):
        fig, axes = new_figure(8, 3, 1, 2)
        runs = [r for r in m.runs if r.ok]
        labels = [f"run {i + 1}" for i in range(len(runs))]
        bar_panel(axes[0][0], labels, [r.wall_s for r in runs], ylabel="seconds", title="wall")
        bar_panel(axes[0][1], labels, [r.peak_rss_tree_mib for r in runs], ylabel="MiB", title="peak RSS (tree)")
        return fig

    paths = write_results(args.name, {"measurement": m.to_json(), "machine": machine}, _markdown(args.name, m, machine),
                          plot, args.out)
    print(json.dumps({"name": args.name, "ok": m.ok, **{k: v for k, v in s.items() if k != "output"}}))
    print(f"-> {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0 if m.ok else 1


if __name__ == "__main__":
    sys.exit(main())
