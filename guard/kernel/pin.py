"""Pinning: enforcement that outlives the daemon, and a new daemon taking over.

Every attachment guard makes is a bpf_link (guard.kernel.loader): the LSM programs
(bcc's ``lsm_fds``) and the cgroup programs (BPF_LINK_CREATE). A link ends
when its last reference goes. A daemon's file descriptors are references
that end with the process, whatever ends it; a pin in bpffs is a reference
that ends only when the pin is removed (or at reboot). So:

* fail-closed (``guard run --pin-dir DIR``, what the service does): once the
  policy is applied, every link and the maps a successor needs are pinned
  under ``DIR/INSTANCE/``. SIGKILL, a crash, SIGTERM, ``systemctl stop``:
  the kernel keeps enforcing the last applied policy. Its events go on into
  the pinned ring buffer (or are counted lost when it is full).
* fail-open (``--fail-open``, or no ``--pin-dir``): nothing is pinned, so
  enforcement ends the moment the process does, on every path, SIGKILL and
  the OOM killer included: no "cleanup on the way out" is needed, or trusted.

An instance is pinned into ``DIR/staging-INSTANCE/`` and then renamed to
``DIR/INSTANCE`` in one rename(2): a successor sees a complete instance or a
staging directory it treats as debris. (A daemon killed while staging leaves
that partial set enforcing until the next daemon removes it; it never takes
anything away from an older complete instance.)

Taking over (``take_over``), by a daemon that has already loaded, attached
and applied its own programs and maps:

1. open the old instance's ring buffer and counters (kept alive by our fds);
2. remove the old instance's pins: its links end, its programs detach;
3. drain what its ring buffer still holds (events of the time no daemon
   read them) and read how many it lost, then close.

Why not reuse the pinned maps instead: bcc builds its map objects from the C
source it compiles and cannot be handed an existing map fd, and the fresh
load costs nothing at a restart (the programs are compiled anyway). Why there
is no gap: the new programs enforce (their maps filled) before the old ones
are detached. For that moment both sets are attached; every program runs on
every hook call and the kernel refuses the call if any of them refuses it
(LSM programs: the first non-zero return; cgroup programs: any "drop"). So the
host is briefly judged by the union of both policies' denials: never less
than either, and a denial of the old policy still produces its event (in the
old ring buffer, drained in step 3).

Manifests (``STATE_DIR/pins/INSTANCE.json``, not in bpffs, which holds BPF
objects only) say what an instance is: its pid, revision and how many lost
events its daemon already reported. A successor uses them to name the rules
of drained events and to report each loss once. Both the pins and the state
directory (tmpfs, /run) are gone after a reboot.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from guard import layout

DEFAULT_PIN_DIR = "/sys/fs/bpf/guard"
BPF_FS_MAGIC = 0xCAFE4A11
STAGING = "staging-"  # bpffs refuses any name with a dot
MANIFESTS = "pins"
LINK_PREFIX = "link_"
MAP_PREFIX = "map_"
# The maps a successor (or an operator's tool) opens through a pin. The others
# stay alive through the pinned programs that use them.
PINNED_MAPS = ("guard_config", "guard_stats", "guard_events", "guard_tamper")
EVENTS_MAP, STATS_MAP = "guard_events", "guard_stats"
DETACH_SETTLE_S = 0.2  # a released link is detached by a kernel work item, not at once


class PinError(RuntimeError):
    """Pinning, or removing pins, failed; says what and where."""


class Pinnable(Protocol):
    families: frozenset[str]

    def links(self) -> dict[str, int]: ...

    def map(self, name: str) -> Any: ...


# --- libbpf, through bcc's library ------------------------------------------------


def _lib() -> Any:
    from bcc.libbcc import lib

    for name, args in (("bpf_obj_pin", [ctypes.c_int, ctypes.c_char_p]),
                       ("bpf_obj_get", [ctypes.c_char_p])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, args
    return lib


def _check(result: int, what: str) -> int:
    if result < 0:  # libbpf 1.x returns -errno
        raise OSError(-result, f"{what}: {os.strerror(-result)}")
    return result


def obj_pin(fd: int, path: Path) -> None:
    _check(int(_lib().bpf_obj_pin(fd, os.fsencode(path))), f"pinning {path}")


def obj_get(path: Path) -> int:
    """A new fd for a pinned object (BPF_OBJ_GET); the caller closes it."""
    return _check(int(_lib().bpf_obj_get(os.fsencode(path))), f"opening {path}")


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


def on_bpffs(path: Path) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return bool((buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC)


# --- manifests (in the state directory) ------------------------------------------


@dataclass(frozen=True)
class Manifest:
    instance: str
    pid: int
    started: str
    revision: str
    policies_dir: str
    host_cgroup: str
    families: tuple[str, ...]
    pin_dir: str
    lost_reported: int = 0  # ring buffer losses its daemon already reported


def manifest_path(state_dir: Path, instance: str) -> Path:
    return state_dir / MANIFESTS / f"{instance}.json"


def write_manifest(state_dir: Path, manifest: Manifest) -> None:
    """Atomically (rename), readable by root only."""
    path = manifest_path(state_dir, manifest.instance)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    body = asdict(manifest)
    body["families"] = list(manifest.families)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, sort_keys=True)
    os.replace(tmp, path)


def read_manifest(state_dir: Path, instance: str) -> Manifest | None:
    try:
        body = json.loads(manifest_path(state_dir, instance).read_text())
        body["families"] = tuple(body.get("families", ()))
        return Manifest(**body)
    except (OSError, ValueError, TypeError):
        return None


def remove_manifest(state_dir: Path, instance: str) -> None:
    with contextlib.suppress(OSError):
        manifest_path(state_dir, instance).unlink()


# --- instances in bpffs --------------------------------------------------------------


def new_instance_name(pid: int | None = None) -> str:
    """Unique among live pins: a dead daemon's pid may come back."""
    return f"{pid or os.getpid()}-{secrets.token_hex(4)}"


def instance_pid(name: str) -> int | None:
    head = name.removeprefix(STAGING).split("-", 1)[0]
    return int(head) if head.isdigit() else None


@dataclass(frozen=True)
class Instance:
    name: str  # directory name, "staging-..." for an incomplete one
    path: Path
    pins: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.name.startswith(STAGING)


def instances(pin_dir: Path) -> list[Instance]:
    """Every instance (complete or staging) under ``pin_dir``, oldest name first."""
    found: list[Instance] = []
    try:
        entries = sorted(os.scandir(pin_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            pins = tuple(sorted(os.listdir(entry.path)))
            found.append(Instance(entry.name, Path(entry.path), pins))
    return found


def _ensure_dir(pin_dir: Path) -> None:
    if not pin_dir.parent.is_dir() or not on_bpffs(pin_dir.parent):
        raise PinError(f"{pin_dir.parent} is not a mounted bpffs "
                       "(mount -t bpf bpf /sys/fs/bpf)")
    pin_dir.mkdir(mode=0o700, exist_ok=True)


def pin_instance(kernel: Pinnable, pin_dir: Path, instance: str) -> Instance:
    """Pin every link and the shared maps into ``pin_dir/instance``, all or nothing."""
    _ensure_dir(pin_dir)
    staging = pin_dir / f"{STAGING}{instance}"
    final = pin_dir / instance
    try:
        staging.mkdir(mode=0o700)
        for name, fd in sorted(kernel.links().items()):
            obj_pin(fd, staging / f"{LINK_PREFIX}{name}")
        for name in PINNED_MAPS:
            try:
                table = kernel.map(name)
            except KeyError:
                continue  # that family is not loaded
            obj_pin(table.map_fd, staging / f"{MAP_PREFIX}{name}")
        os.rename(staging, final)
    except OSError as error:
        with contextlib.suppress(OSError):
            unpin(staging)
        raise PinError(f"pinning into {final} failed: {error}") from error
    return Instance(instance, final, tuple(sorted(os.listdir(final))))


def unpin(path: Path) -> list[str]:
    """Remove an instance directory and its pins; the pins' names."""
    removed: list[str] = []
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return removed
    for name in names:
        (path / name).unlink()
        removed.append(name)
    path.rmdir()
    return removed


# --- taking over from a previous daemon -------------------------------------------


@dataclass
class Retired:
    """What a retired instance left: its undelivered records and its losses."""

    instance: str
    pins: list[str]
    records: list[bytes] = field(default_factory=list)
    lost_total: int | None = None  # its kernel lost-event counter, if readable
    manifest: Manifest | None = None

    @property
    def lost_unreported(self) -> int:
        if self.lost_total is None:
            return 0
        reported = self.manifest.lost_reported if self.manifest else 0
        return max(0, self.lost_total - reported)


def _drain_ringbuf(fd: int, limit: int = 1 << 20) -> list[bytes]:
    from bcc.libbcc import _RINGBUF_CB_TYPE, lib

    records: list[bytes] = []

    def take(_ctx: Any, data: Any, size: int) -> int:
        if len(records) < limit:
            records.append(ctypes.string_at(data, size))
        return 0

    callback = _RINGBUF_CB_TYPE(take)
    manager = lib.bpf_new_ringbuf(fd, callback, None)
    if not manager:
        raise OSError(ctypes.get_errno() or 22, "cannot open the previous ring buffer")
    try:
        for _ in range(8):  # consume() empties the buffer; a second call sees the rest
            if lib.bpf_consume_ringbuf(manager) <= 0:
                break
    finally:
        lib.bpf_free_ringbuf(manager)
    return records


def _percpu_sum(fd: int, index: int) -> int:
    from bcc.libbcc import lib
    from bcc.utils import get_possible_cpus

    cpus = len(get_possible_cpus())
    values = (ctypes.c_uint64 * cpus)()
    key = ctypes.c_uint32(index)
    if lib.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(values)) != 0:
        raise OSError(ctypes.get_errno() or 2, "cannot read the previous counters")
    return int(sum(values))


def retire(instance: Instance, manifest: Manifest | None = None,
           settle_s: float = DETACH_SETTLE_S) -> Retired:
    """Detach an instance (remove its pins), then collect what it left behind."""
    fds: dict[str, int] = {}
    result = Retired(instance.name, [], manifest=manifest)
    for name in (EVENTS_MAP, STATS_MAP):
        pin = instance.path / f"{MAP_PREFIX}{name}"
        if pin.exists():
            with contextlib.suppress(OSError):
                fds[name] = obj_get(pin)
    try:
        result.pins = unpin(instance.path)
        if fds:
            time.sleep(settle_s)  # let the released links detach before reading
        if EVENTS_MAP in fds:
            with contextlib.suppress(OSError):
                result.records = _drain_ringbuf(fds[EVENTS_MAP])
        if STATS_MAP in fds:
            with contextlib.suppress(OSError):
                result.lost_total = _percpu_sum(fds[STATS_MAP], layout.STAT_EVENTS_LOST)
    finally:
        for fd in fds.values():
            os.close(fd)
    return result


def take_over(pin_dir: Path, own: str, state_dir: Path) -> Iterator[Retired]:
    """Retire every instance under ``pin_dir`` but ``own``, oldest first."""
    for instance in instances(pin_dir):
        if instance.name == own:
            continue
        name = instance.name.removeprefix(STAGING)
        manifest = read_manifest(state_dir, name)
        retired = retire(instance, manifest)
        remove_manifest(state_dir, name)
        yield retired


def remove_all(pin_dir: Path, state_dir: Path | None = None) -> list[Retired]:
    """``guard stop --unload``: every instance's pins, then the directory itself."""
    done: list[Retired] = []
    for instance in instances(pin_dir):
        done.append(Retired(instance.name, unpin(instance.path)))
        if state_dir is not None:
            remove_manifest(state_dir, instance.name.removeprefix(STAGING))
    with contextlib.suppress(FileNotFoundError):
        if not any(pin_dir.iterdir()):
            pin_dir.rmdir()
    return done


# --- the daemon's side -------------------------------------------------------------------


@dataclass
class Persistence:
    """One daemon's pins: where, which instance, and what it took over."""

    pin_dir: Path | None  # where pins are made and looked for; None: nowhere
    state_dir: Path
    fail_open: bool = False  # True: pin nothing (earlier daemons' pins are still retired)
    instance: str = field(default_factory=new_instance_name)
    pinned: Instance | None = None
    manifest: Manifest | None = None
    taken_over: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""  # why pinning failed, when it did

    @property
    def mode(self) -> str:
        return "fail-open" if self.fail_open or self.pin_dir is None else "fail-closed"

    def pin(self, kernel: Pinnable, manifest: Manifest) -> Instance | None:
        if self.pin_dir is None or self.fail_open:
            return None
        self.pinned = pin_instance(kernel, self.pin_dir, self.instance)
        self.manifest = manifest
        write_manifest(self.state_dir, manifest)
        return self.pinned

    def take_over(self) -> Iterator[Retired]:
        """Retire the instances of earlier daemons (in fail-open mode too: the
        new daemon enforces now, and old pins would enforce a stale policy)."""
        if self.pin_dir is None or not self.pin_dir.exists():
            return
        for retired in take_over(self.pin_dir, self.instance, self.state_dir):
            self.taken_over.append({
                "instance": retired.instance,
                "pid": retired.manifest.pid if retired.manifest else
                instance_pid(retired.instance),
                "revision": retired.manifest.revision if retired.manifest else None,
                "pins": len(retired.pins),
                "events_drained": len(retired.records),
                "lost": retired.lost_unreported,
            })
            yield retired

    def lost_reported(self, total: int) -> None:
        """Record the ring buffer losses already reported, for a successor."""
        if self.manifest is None or self.manifest.lost_reported == total:
            return
        self.manifest = Manifest(**{**asdict(self.manifest), "lost_reported": total,
                                    "families": self.manifest.families})
        with contextlib.suppress(OSError):
            write_manifest(self.state_dir, self.manifest)

    def release(self) -> list[str]:
        """Remove this daemon's own pins (``guard stop --unload``)."""
        if self.pinned is None:
            return []
        removed = unpin(self.pinned.path)
        remove_manifest(self.state_dir, self.instance)
        self.pinned = None
        if self.pin_dir is not None:
            with contextlib.suppress(OSError):
                if not any(self.pin_dir.iterdir()):
                    self.pin_dir.rmdir()
        return removed

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "error": self.error,
            "dir": str(self.pin_dir) if self.pin_dir is not None else None,
            "instance": self.pinned.name if self.pinned else None,
            "pins": list(self.pinned.pins) if self.pinned else [],
            "taken_over": list(self.taken_over),
        }


def describe_pinned(pin_dir: Path, state_dir: Path) -> list[str]:
    """What stays enforced with no daemon running, one line per instance."""
    lines = []
    for item in instances(pin_dir):
        manifest = read_manifest(state_dir, item.name.removeprefix(STAGING))
        what = (f"revision {manifest.revision}, policies {manifest.policies_dir}"
                if manifest else "no manifest")
        state = "still enforcing" if item.complete else "partly pinned (an interrupted start)"
        pid = instance_pid(item.name)
        alive = "is gone" if pid is None or process_gone(pid) else "still runs"
        lines.append(f"{state}: {item.path} (pid {pid} {alive}; {what}); "
                     "`guard stop --unload` removes it, a new daemon takes it over")
    return lines


def pinned_summary(pin_dir: Path) -> list[dict[str, Any]]:
    """What is pinned under ``pin_dir``, for ``guard status`` without a daemon."""
    return [{"instance": i.name, "complete": i.complete, "pid": instance_pid(i.name),
             "pins": list(i.pins)} for i in instances(pin_dir)]


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie its parent has not reaped yet counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rfind(")") + 2:].startswith(("Z", "X"))
