"""The run folder every trainer writes, in one place: config, metrics, checkpoints, resume.

Layout (docs/architecture.md, "Run folder")::

    OUTPUT_DIR/
      config.yaml                 the fully resolved config of this run
      metrics.jsonl               one JSON object per logged unit; written line-atomically
      checkpoints/
        checkpoint-<N>/           N = units done (epochs for prdp/ddpo, steps for rpo/reward_model/sds3d)
          trainer_state.json      {"unit", "done", "metrics_rows", trainer extras, JSON state of objects}
          *.safetensors, unet/    weights and optimiser state (safetensors only: loading never runs code)
          manifest.json           written last: size and sha256 of every file above

Why it is built this way (each point is a way users lost runs elsewhere):

* a checkpoint is written into ``checkpoints/.tmp-checkpoint-<N>`` and renamed into place when complete, and
  its manifest is written last, so a kill during a save never leaves a folder that looks complete;
* ``resume_from: latest`` takes the newest checkpoint whose manifest verifies (sizes *and* hashes, so a
  truncated or zeroed weight file is caught) and warns about every newer one it skipped; a checkpoint named
  explicitly that does not verify stops with one line naming the file;
* a fresh run into a folder that holds another run stops with one line (resume it, or
  ``checkpoint.overwrite: true``, or another ``output_dir``), so two runs never mix;
* on resume ``metrics.jsonl`` is cut to the rows that were written when the checkpoint was saved (the count is
  in the checkpoint), so no row is duplicated or lost, whatever the rows contain; a torn last line is dropped;
* state is JSON or safetensors, never pickle: a checkpoint shared by someone else cannot run code on load.

Nothing here knows about models: trainers hand it a function that writes their weights and the state to keep.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from genreward.config import save_config
from genreward.errors import GenrewardError, RunInterrupted

log = logging.getLogger("genreward.run")

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


@dataclass
class CheckpointSection:
    """Checkpointing, the same keys for every trainer (the unit N counts epochs or steps, per trainer)."""

    every: int = 10  # save every N units (epochs or steps, see the trainer's docs); 0 = only at the end
    total_limit: int | None = None  # keep at most this many checkpoints (oldest removed after a save)
    resume_from: str | None = None  # "latest" (newest checkpoint that verifies) or a checkpoint folder
    overwrite: bool = False  # a fresh run may replace an earlier run in output_dir

    __moved_keys__ = {"every_epochs": "every"}

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"key 'checkpoint.every' must be >= 0, got {self.every}")
        if self.total_limit is not None and self.total_limit < 1:
            raise ValueError(f"key 'checkpoint.total_limit' must be >= 1 or null, got {self.total_limit}")
        if self.resume_from is not None and not str(self.resume_from).strip():
            raise ValueError("key 'checkpoint.resume_from' must be 'latest', a checkpoint folder, or null")


# ----------------------------------------------------------------------------------------- fault injection

FAULT_ENV = "GENREWARD_FAULT"  # e.g. "save_files:2" = SIGKILL this process the 2nd time it reaches "save_files"
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process here when ``$GENREWARD_FAULT`` names this point (crash tests; a no-op otherwise).

    Points: ``log`` (after a metrics row is written), ``save_files`` (checkpoint files written, manifest not yet),
    ``save_manifest`` (manifest written, folder not yet renamed), ``saved`` (checkpoint in place), and ``unit``
    (a trainer finished one unit of work, before logging it).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers see old or new, never half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Size and sha256 of every file in ``folder`` (fsynced first), written last."""
    entries = {}
    for path in _files(folder):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        entries[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    write_text_atomic(folder / MANIFEST, json.dumps({"format": FORMAT_VERSION, "files": entries}, indent=1) + "\n")


def verify_checkpoint(folder: Path) -> str | None:
    """None if ``folder`` is a complete, undamaged checkpoint; else a one-line reason naming the file."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not manifest.is_file():
        return f"{manifest} is missing (the checkpoint was not completed)"
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return f"{manifest} is not a valid manifest"
    if STATE_FILE not in entries:
        return f"{manifest} does not list {STATE_FILE}"
    for rel, want in entries.items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want.get("size"):
            return f"{path} has {path.stat().st_size} bytes, the manifest says {want.get('size')} (truncated or changed)"
        if sha256_file(path) != want.get("sha256"):
            return f"{path} does not match its sha256 in the manifest (damaged or changed)"
    return None


# -------------------------------------------------------------------------------- tensors ⇄ safetensors


def save_tree(tree: Any, path: Path) -> None:
    """A nested structure of dicts/lists/numbers/strings/tensors → one safetensors file.

    Tensors go into the file's tensor table; the skeleton (with ``{"__tensor__": key}`` placeholders) goes into
    its metadata as JSON. Optimiser and scheduler state dicts, RNG states and reward states all fit this.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def pack(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {"__dict__": [[pack(k), pack(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [pack(v) for v in value]}
        if isinstance(value, list):
            return [pack(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot save a {type(value).__name__} in a checkpoint (only tensors and plain data)")

    skeleton = pack(tree)
    save_file(tensors, str(path), metadata={"tree": json.dumps(skeleton)})


def load_tree(path: Path, device: str | torch.device = "cpu") -> Any:
    """Inverse of :func:`save_tree` (no pickle involved)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as fh:
        skeleton = json.loads(fh.metadata()["tree"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}

    def unpack(value: Any) -> Any:
        if isinstance(value, dict):
            if "__tensor__" in value:
                return tensors[value["__tensor__"]]
            if "__tuple__" in value:
                return tuple(unpack(v) for v in value["__tuple__"])
            return {unpack(k): unpack(v) for k, v in value["__dict__"]}
        if isinstance(value, list):
            return [unpack(v) for v in value]
        return value

    return unpack(skeleton)


def rng_state() -> dict[str, Any]:
    """Every global RNG this process uses (torch CPU/CUDA, numpy, Python), as plain data + tensors."""
    import random

    import numpy as np

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    version, internal, gauss_next = random.getstate()
    state["python"] = {"version": version, "internal": list(internal), "gauss_next": gauss_next}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# ------------------------------------------------------------------------------------------ the run dir


class RunDir:
    """The run folder of one training run. ``unit`` names what checkpoints count: ``"epoch"`` or ``"step"``.

    Use: ``rd = RunDir(output_dir, "epoch", config.checkpoint)``; ``resume = rd.prepare()`` *before* anything
    is written (it raises on a conflicting folder or a damaged named checkpoint); then, once every input has
    been validated, ``rd.start(config, resume)`` writes ``config.yaml`` and cuts ``metrics.jsonl``; ``rd.log(row)``
    per unit; ``rd.save(done, write_files, state)`` for a checkpoint; ``rd.load_state(path)`` to read one.
    ``is_main`` is False on the non-zero ranks of a multi-process run: they read but never write.
    """

    def __init__(self, output_dir: str | Path, unit: str, checkpoint: CheckpointSection, is_main: bool = True) -> None:
        if unit not in ("epoch", "step"):
            raise ValueError(f"RunDir unit must be 'epoch' or 'step', got {unit!r}")
        self.root = Path(output_dir)
        self.unit = unit
        self.cfg = checkpoint
        self.is_main = is_main
        self.metrics_rows = 0
        self._stop_signal: int | None = None
        self._old_handlers: dict[int, Any] = {}

    # ---------------------------------------------------------------------------- paths
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_path(self, done: int) -> Path:
        return self.checkpoints_dir / f"checkpoint-{int(done)}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Every ``checkpoint-N`` folder (verified or not), oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for p in self.checkpoints_dir.iterdir():
            m = _CHECKPOINT_RE.fullmatch(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def holds_run(self) -> bool:
        """True if the folder holds (part of) an earlier run: its config, metrics or checkpoints."""
        return self.config_path.exists() or self.metrics_path.exists() or bool(self.list_checkpoints())

    # ---------------------------------------------------------------------------- start
    def latest_verified(self) -> Path | None:
        """The newest checkpoint whose manifest verifies; warns about every newer one skipped."""
        for done, path in reversed(self.list_checkpoints()):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            log.warning("skipping damaged or incomplete checkpoint %s: %s", path.name, problem)
            print(f"WARNING: skipping checkpoint {path}: {problem}", file=sys.stderr)
        return None

    def prepare(self) -> Path | None:
        """Decide what this run is, writing nothing: the checkpoint to resume from, or None for a fresh start.

        Raises a one-line :class:`GenrewardError` when a fresh run would mix with another run in the folder, or
        when an explicitly named checkpoint is missing or does not verify.
        """
        spec = self.cfg.resume_from
        if self.root.exists() and not self.root.is_dir():
            raise GenrewardError(f"output_dir {self.root} exists and is not a folder")
        if not spec:
            if self.holds_run() and not self.cfg.overwrite:
                raise GenrewardError(
                    f"output_dir {self.root} holds an earlier run; resume it with checkpoint.resume_from=latest, "
                    "or start over with checkpoint.overwrite=true or another output_dir"
                )
            return None
        if spec == "latest":
            path = self.latest_verified()
            if path is None:
                log.warning("checkpoint.resume_from=latest but %s holds no complete checkpoint; starting from scratch",
                            self.checkpoints_dir)
            return path
        path = Path(spec)
        if not path.is_dir():
            raise GenrewardError(f"checkpoint.resume_from: {path} is not a folder")
        problem = verify_checkpoint(path)
        if problem is not None:
            raise GenrewardError(f"checkpoint.resume_from: {problem}")
        return path

    def start(self, config: Any, resume: Path | None) -> None:
        """Write ``config.yaml``; a fresh run removes the earlier run's files, a resumed one cuts the metrics."""
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if resume is None:
                if self.cfg.overwrite:
                    self._clear_previous_run()
                # A fresh start (also ``latest`` with nothing to resume) begins an empty log: no stale rows.
                self.metrics_rows = 0
                write_text_atomic(self.metrics_path, "")
            else:
                self.metrics_rows = self._truncate_metrics(int(self.load_state(resume).get("metrics_rows", 0)))
            save_config(config, self.root)
        else:
            self.metrics_rows = int(self.load_state(resume).get("metrics_rows", 0)) if resume is not None else 0

    def _clear_previous_run(self) -> None:
        """``checkpoint.overwrite``: empty the folder of the earlier run (its checkpoints, metrics, evaluations,
        negatives, galleries...), so nothing of it can leak into the new run."""
        if not self.holds_run():
            return
        for child in self.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _truncate_metrics(self, rows: int) -> int:
        """Keep the first ``rows`` complete rows of metrics.jsonl (a torn or extra tail is dropped)."""
        kept: list[str] = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
                if len(kept) == rows:
                    break
                if not line.endswith("\n"):
                    break  # a torn last line from a kill mid-write
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    break
                kept.append(line)
        if len(kept) < rows:
            log.warning("metrics.jsonl has %d rows but the checkpoint was saved after %d", len(kept), rows)
            print(f"WARNING: {self.metrics_path} has {len(kept)} of the {rows} rows its checkpoint expects", file=sys.stderr)
        write_text_atomic(self.metrics_path, "".join(kept))
        return len(kept)

    def metrics(self) -> list[dict]:
        """The complete rows of metrics.jsonl (a torn last line is skipped)."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    # ---------------------------------------------------------------------------- metrics
    def log(self, record: dict) -> None:
        """Append one row with a single ``write`` on an O_APPEND descriptor (a kill leaves whole rows or a torn
        last line that resume drops, never an interleaved one), then fsync."""
        if not self.is_main:
            self.metrics_rows += 1
            return
        data = (json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8")
        fd = os.open(str(self.metrics_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.metrics_rows += 1
        fault_point("log")

    # ---------------------------------------------------------------------------- checkpoints
    def save(self, done: int, write_files: Callable[[Path], None] | None, state: dict[str, Any]) -> Path:
        """``checkpoint-<done>``: ``write_files(folder)`` writes weights/optimiser files, then the state JSON, then
        the manifest; the folder is renamed into place only when complete. Main process only (others return
        the path). ``state`` must be JSON-serialisable."""
        final = self.checkpoint_path(done)
        if not self.is_main:
            return final
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoints_dir / f".tmp-checkpoint-{int(done)}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if write_files is not None:
            write_files(tmp)
        payload = {"format": FORMAT_VERSION, "unit": self.unit, "done": int(done), "metrics_rows": self.metrics_rows, **state}
        (tmp / STATE_FILE).write_text(json.dumps(payload, allow_nan=True) + "\n", encoding="utf-8")
        fault_point("save_files")
        write_manifest(tmp)
        fault_point("save_manifest")
        if final.exists():  # an older, replaced checkpoint of the same count (e.g. left by a damaged run)
            trash = self.checkpoints_dir / f".old-checkpoint-{int(done)}"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.checkpoints_dir)
        self._prune(keep=final)
        fault_point("saved")
        return final

    def _prune(self, keep: Path) -> None:
        limit = self.cfg.total_limit
        if limit is None:
            return
        found = [p for _, p in self.list_checkpoints()]
        for old in found[: max(0, len(found) - limit)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def load_state(self, path: Path) -> dict[str, Any]:
        """The trainer state JSON of a checkpoint (one-line error if unreadable)."""
        file = Path(path) / STATE_FILE
        try:
            state = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GenrewardError(f"{file}: cannot read the trainer state ({type(exc).__name__})") from None
        if not isinstance(state, dict) or "done" not in state:
            raise GenrewardError(f"{file}: not a genreward trainer state (no 'done')")
        if state.get("unit", self.unit) != self.unit:
            raise GenrewardError(f"{file}: counts {state.get('unit')}s but this trainer counts {self.unit}s")
        return state

    def due(self, done: int, total: int) -> bool:
        """Is a periodic checkpoint due after ``done`` of ``total`` units? (The final one is the trainer's.)"""
        every = self.cfg.every
        return bool(every) and done % every == 0 and done < total

    # ---------------------------------------------------------------------------- signals
    def catch_signals(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        """SIGINT/SIGTERM set a flag that the trainer checks at unit boundaries (a second one kills at once)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self._stop_signal is not None:
                self.release_signals()
                raise KeyboardInterrupt
            self._stop_signal = signum
            name = signal.Signals(signum).name
            print(f"\n{name} received: finishing the current {self.unit}, saving a checkpoint, then stopping "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

        for sig in signals:
            self._old_handlers[sig] = signal.signal(sig, handler)

    def release_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old_handlers = {}

    @property
    def stop_signal(self) -> int | None:
        return self._stop_signal

    def interrupted(self, path: Path) -> RunInterrupted:
        """The error a trainer raises after saving ``path`` because a stop signal arrived."""
        signum = int(self._stop_signal or signal.SIGTERM)
        name = signal.Signals(signum).name
        self.release_signals()
        return RunInterrupted(
            f"stopped by {name}; checkpoint saved at {path} (continue with checkpoint.resume_from=latest)", signum
        )


def copy_files_to(folder: Path, files: Iterable[Path]) -> None:
    """Copy extra files (e.g. a judge's processor files) into a checkpoint being written."""
    for f in files:
        shutil.copy2(f, Path(folder) / Path(f).name)
