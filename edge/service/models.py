"""The device's installed bundles: install (checked, copied, switched atomically), roll back, status, history."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from hematovision.errors import ConfigError, ModelInvalid
from hematovision.pixels import list_images, read_rgb

from ..config import CURRENT_MODEL, MODELS_FOLDER, SAMPLE_CELLS, Config, default_model, load_config
from ..vision.model_bundle import META_FILE, Bundle, load_bundle, read_meta

logger = logging.getLogger(__name__)

# MODELS/versions/<name>-<stamp>/ holds each bundle installed, never changed once there; MODELS/current and
# MODELS/previous are symlinks into it, each switched by one rename.
VERSIONS, CURRENT, PREVIOUS = "versions", CURRENT_MODEL, "previous"
HISTORY = "history.jsonl"  # one JSON object per install or rollback, appended
LOCK = ".lock"
KEEP_VERSIONS = 5  # current, previous and the latest others (a specimen still counting may use one)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class InstallRefused(ModelInvalid):
    """The models folder cannot take the change asked for (no previous bundle, another install running)."""


@dataclass(frozen=True)
class InstalledBundle:
    """A bundle of the models folder as `model status` shows it; `adapted_from` is the stamp of the bundle it was
    adapted from (bundle.json's adaptation.base_meta_sha256), None for one trained from scratch."""

    folder: Path
    name: str
    created_at: str | None
    meta_sha256: str
    adapted_from: str | None = None

    @classmethod
    def read(cls, folder: Path) -> InstalledBundle:
        """What bundle.json says of the bundle in `folder`. Raises ModelInvalid when it cannot be read."""
        meta = read_meta(Path(folder) / META_FILE)
        adaptation = meta.get("adaptation")
        base = adaptation.get("base_meta_sha256") if isinstance(adaptation, dict) else None
        return cls(Path(folder), str(meta.get("name", "model")), _text_or_none(meta.get("created_at")),
                   str(meta.get("meta_sha256", "")), _text_or_none(base))

    def to_dict(self) -> dict:
        return {"folder": self.folder.name, "name": self.name, "created_at": self.created_at,
                "meta_sha256": self.meta_sha256, "adapted_from": self.adapted_from}

    def lines(self, role: str) -> list[str]:
        """The bundle in a few lines: name, export time, short stamp, and what it was adapted from."""
        exported = self.created_at or "at an unknown time"
        out = [f"{role}: {self.name} (bundle {self.meta_sha256[:12]}, exported {exported})", f"  folder {self.folder}"]
        return out + ([f"  adapted from bundle {self.adapted_from[:12]}"] if self.adapted_from else [])


@dataclass(frozen=True)
class SmokeTest:
    """The sample cells a bundle classified before it was installed: how many, how many no white cell was found
    in (not the bundle's doing), and, of those of a class the bundle has, how many it gave that class."""

    cells: int
    not_located: int
    known: int
    agreed: int

    @property
    def text(self) -> str:
        return (f"{self.cells} sample cells classified ({self.agreed} of the {self.known} of its classes as labelled"
                f"{f'; no white cell found in {self.not_located}' if self.not_located else ''})")


@dataclass(frozen=True)
class InstallChecks:
    """What a bundle must pass besides its own checks: the device's calibration profile (its pixel size against the
    bundle's), and the sample cells it classifies."""

    threads: int | None = None
    profile: object | None = None  # a CalibrationProfile, or None
    samples: Path = SAMPLE_CELLS


@dataclass(frozen=True)
class Change:
    """What an install or rollback did: the bundle now current and the one kept as previous."""

    action: str  # "install" or "rollback"
    current: InstalledBundle
    previous: InstalledBundle | None
    changed: bool = True  # False: the bundle was installed already
    smoke: SmokeTest | None = None


# --- checks ------------------------------------------------------------------------------

def check_bundle(path: Path, checks: InstallChecks) -> tuple[Bundle, SmokeTest]:
    """The bundle loaded and verified (load_bundle: hashes, stamp, fields, shapes, novelty), against the calibration
    profile, and tried on the sample cells. Raises ModelInvalid (or CalibrationError, ConfigError) naming the
    problem."""
    bundle = load_bundle(path, checks.threads)
    if checks.profile is not None:
        from ..vision.pipeline import FieldPipeline  # noqa: PLC0415

        FieldPipeline(bundle, checks.profile)  # the profile's pixel size against the bundle's
    return bundle, smoke_test(bundle, checks.samples)


def smoke_test(bundle: Bundle, samples: Path) -> SmokeTest:
    """Classify the sample cells (class sub-folders of single-cell images) as the device does. Raises ModelInvalid
    when there are none, when the model gives no valid probabilities, or the same answer for every cell."""
    from ..vision.classify import classify_cell_image  # noqa: PLC0415
    from ..vision.locate import NoCellFound  # noqa: PLC0415

    paths = sorted(p for folder in _class_folders(samples) for p in list_images(folder))
    rows, not_located, known, agreed = [], 0, 0, 0
    for path in paths:
        try:
            _, prediction = classify_cell_image(bundle, read_rgb(path), None, str(path))
        except NoCellFound:
            not_located += 1
            continue
        rows.append([prediction.probabilities[c] for c in bundle.classes])
        if path.parent.name in bundle.classes:
            known += 1
            agreed += prediction.label == path.parent.name
    _check_probabilities(np.array(rows, np.float64), bundle, samples)
    return SmokeTest(len(rows), not_located, known, agreed)


def _class_folders(samples: Path) -> list[Path]:
    if not samples.is_dir():
        raise ModelInvalid(f"no sample cells at {samples} to try the bundle on; give --samples FOLDER (class "
                           "sub-folders of single-cell images, e.g. samples/pbc of the repository)")
    return sorted(p for p in samples.iterdir() if p.is_dir())


def _check_probabilities(probs: np.ndarray, bundle: Bundle, samples: Path) -> None:
    where = f"{bundle.path}: on the sample cells of {samples}"
    if len(probs) < 2:
        raise ModelInvalid(f"{where}: fewer than 2 cells could be classified; give --samples FOLDER with more "
                           "single-cell images")
    if not np.isfinite(probs).all() or np.abs(probs.sum(axis=1) - 1.0).max() > 1e-3:
        raise ModelInvalid(f"{where}: the model gives no valid probabilities; the bundle is broken, export it again")
    if np.ptp(probs, axis=0).max() < 1e-6:
        raise ModelInvalid(f"{where}: the model gives the same answer for every cell; the bundle is broken, "
                           "export it again")


# --- the models folder ---------------------------------------------------------------------

class Models:
    """The models folder: installed bundles by version, `current` (what the daemon counts with from its next
    specimen) and `previous` (what `rollback` restores), and the history of changes. Changes hold a lock."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def current(self) -> InstalledBundle | None:
        return self._read(CURRENT)

    def previous(self) -> InstalledBundle | None:
        return self._read(PREVIOUS)

    def _read(self, link: str) -> InstalledBundle | None:
        path = self.root / link
        return InstalledBundle.read(path.resolve()) if path.exists() else None

    def install(self, source: Path, checks: InstallChecks = InstallChecks(), fallback: Path | None = None) -> Change:
        """Check `source` (check_bundle), copy it into the folder, verify the copy, and make it current; the bundle
        current before (or, at the first install, `fallback`: what the device counted with until then) becomes
        previous. Raises ModelInvalid (nothing changed) for a bundle that fails a check, InstallRefused."""
        _, smoke = check_bundle(Path(source), checks)
        with self._locked():
            version = self._add_version(Path(source), checks.threads)
            old = self._target(CURRENT)
            if old == version:
                return Change("install", InstalledBundle.read(version), self.previous(), changed=False, smoke=smoke)
            if old is None and fallback is not None:
                old = self._fallback_version(fallback, checks.threads)
            if old is not None:
                self._switch(PREVIOUS, old)
            self._switch(CURRENT, version)
            change = Change("install", InstalledBundle.read(version), self.previous(), smoke=smoke)
            self._log(change, source=str(Path(source).resolve()))
            self._prune()
        return change

    def rollback(self, threads: int | None = None) -> Change:
        """Make the previous bundle current again (verified first) and the current one previous. Raises
        InstallRefused when there is no previous bundle, ModelInvalid when it no longer verifies (nothing changed)."""
        with self._locked():
            old, back = self._target(CURRENT), self._target(PREVIOUS)
            if back is None:
                raise InstallRefused(f"{self.root}: no previous bundle to roll back to; install one with "
                                     "hematovision-edge model install BUNDLE")
            load_bundle(back, threads)
            if old is not None:
                self._switch(PREVIOUS, old)
            self._switch(CURRENT, back)
            change = Change("rollback", InstalledBundle.read(back), self.previous())
            self._log(change)
        return change

    def history(self, limit: int = 10) -> list[dict]:
        """The latest changes, oldest first (lines that cannot be read are passed over)."""
        try:
            lines = (self.root / HISTORY).read_text("utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines[-limit:]:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    # --- steps --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        (self.root / VERSIONS).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        for path in (self.root, self.root / VERSIONS, self.root / LOCK):
            _same_owner(path, self.root.parent)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise InstallRefused(f"{self.root}: another install or rollback is running; wait for it, then try "
                                     "again") from err
            yield
        finally:
            os.close(fd)

    def _target(self, link: str) -> Path | None:
        """The version folder a link names, or None when there is no link."""
        path = self.root / link
        return path.resolve() if os.path.lexists(path) else None

    def _add_version(self, source: Path, threads: int | None) -> Path:
        """The version folder of `source`: copied in through a temporary folder (renamed whole) and verified, or the
        one there already. Raises ModelInvalid when the copy does not verify."""
        meta = read_meta(source / META_FILE)
        name = _UNSAFE.sub("_", str(meta.get("name", "model"))).strip("._-")[:60] or "model"
        version = self.root / VERSIONS / f"{name}-{str(meta.get('meta_sha256', ''))[:12]}"
        if version.is_dir() and self._still_sound(version, threads):
            return version.resolve()
        incoming = self.root / VERSIONS / f".incoming-{secrets.token_hex(6)}"
        try:
            _copy_bundle(source, incoming)
            load_bundle(incoming, threads)  # the copy, byte for byte what the hashes say
            _same_owner(incoming, self.root.parent, whole=True)
            _replace_folder(incoming, version)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        return version.resolve()

    @staticmethod
    def _still_sound(version: Path, threads: int | None) -> bool:
        """A version folder installed before that still verifies; one that does not is logged (and copied again)."""
        try:
            load_bundle(version, threads)
        except ModelInvalid as err:
            logger.warning("the installed copy %s is damaged (%s): copied again", version, err)
            return False
        return True

    def _fallback_version(self, fallback: Path, threads: int | None) -> Path | None:
        """The bundle counted with before the first install, kept as previous (None when it does not verify)."""
        try:
            return self._add_version(Path(fallback), threads)
        except ModelInvalid as err:
            logger.warning("the bundle used until now (%s) is not kept as previous: %s", fallback, err)
            return None

    def _switch(self, link: str, version: Path) -> None:
        """Point `link` at `version` by renaming a new symlink over it: never missing, never half-written."""
        temporary = self.root / f".{link}.{secrets.token_hex(6)}"
        os.symlink(os.path.relpath(version, self.root), temporary)
        try:
            os.replace(temporary, self.root / link)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _same_owner(self.root / link, self.root.parent)
        _fsync_folder(self.root)

    def _log(self, change: Change, **extra) -> None:
        entry = {"at": datetime.now().astimezone().isoformat(timespec="seconds"), "action": change.action,
                 "user": _user(), "current": change.current.to_dict(),
                 "previous": change.previous.to_dict() if change.previous else None, **extra}
        path = self.root / HISTORY
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _same_owner(path, self.root.parent)
        logger.info("%s: %s is now current (bundle %s)", change.action, change.current.name,
                    change.current.meta_sha256[:12])

    def _prune(self) -> None:
        """Delete the oldest version folders beyond KEEP_VERSIONS, never current or previous."""
        keep = {self._target(CURRENT), self._target(PREVIOUS)}
        versions = sorted((p for p in (self.root / VERSIONS).iterdir() if p.is_dir() and not p.name.startswith(".")),
                          key=lambda p: p.stat().st_mtime, reverse=True)
        others = [p for p in versions if p.resolve() not in keep]
        for old in others[max(KEEP_VERSIONS - len(keep), 0):]:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("deleted the old installed bundle %s", old.name)


def _copy_bundle(source: Path, target: Path) -> None:
    """Every file of the bundle folder (bundle.json, model.tflite and any array files it names), each fsynced.
    Raises ModelInvalid naming a file that cannot be read or written."""
    target.mkdir(mode=0o755)
    try:
        for path in sorted(source.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                shutil.copyfile(path, target / path.name)
                os.chmod(target / path.name, 0o644)
                with open(target / path.name, "rb") as handle:
                    os.fsync(handle.fileno())
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ModelInvalid(f"no space left to install {source} in {target.parent}; free disk space") from err
        raise ModelInvalid(f"cannot copy {source} into {target.parent}: {err.strerror} ({err.filename}); check "
                           "both folders and their permissions") from err
    _fsync_folder(target)


def _replace_folder(new: Path, target: Path) -> None:
    """Rename a finished folder into place; a damaged one there is moved aside first, then deleted."""
    damaged = target.parent / f".damaged-{secrets.token_hex(6)}"
    if target.exists():
        os.rename(target, damaged)
    os.rename(new, target)
    _fsync_folder(target.parent)
    shutil.rmtree(damaged, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_owner(path: Path, like: Path, whole: bool = False) -> None:
    """Run as root (sudo), what is written belongs to the state folder's owner, the service's user, as the rest of
    the state does (`whole`: a folder with everything in it); files stay readable by the service either way."""
    if os.geteuid() != 0 or not like.exists():
        return
    stat = like.stat()
    for item in [Path(path), *(Path(path).rglob("*") if whole else [])]:
        os.lchown(item, stat.st_uid, stat.st_gid)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None



# --- the commands' setting ----------------------------------------------------------------

@dataclass(frozen=True)
class DeviceModels:
    """The models folder of a device and what installing into it checks; `fallback` is the bundle counted with
    while none is installed."""

    models: Models
    fallback: Path | None
    checks: InstallChecks


def device_models(config_path: Path | None, state_dir: Path | None = None, samples: Path | None = None,
                  threads: int | None = None) -> DeviceModels:
    """The models folder of the state folder `state_dir`, else of the configuration's state folder (whose
    calibration profile a bundle is checked against). Raises ConfigError when the configuration is bad, or names a
    model.bundle that installing would not change."""
    samples = samples or SAMPLE_CELLS
    if state_dir is not None:
        return DeviceModels(Models(Path(state_dir) / MODELS_FOLDER), default_model(), InstallChecks(threads, None,
                                                                                                     samples))
    config = load_config(config_path)
    check_uses_installed(config)
    profile = None
    if config.calibration.profile:
        from hematovision.calibration.profile import load_profile  # noqa: PLC0415

        profile = load_profile(config.resolve(config.calibration.profile))
    return DeviceModels(Models(config.models_dir()), default_model(),
                        InstallChecks(threads or config.model.threads or None, profile, samples))


def check_uses_installed(config: Config) -> None:
    """Raises ConfigError when model.bundle names a folder other than the installed bundle's link."""
    link = config.models_dir() / CURRENT
    if config.model.bundle and config.resolve(config.model.bundle) != link.resolve():
        raise ConfigError(f"{config.path}: model.bundle = {config.model.bundle!r}: the daemon counts with that folder, "
                          "whatever is installed; set model.bundle = \"\" (the installed bundle, else the reference) "
                          f"or \"{link}\", then restart the daemon")


def change_lines(change: Change) -> list[str]:
    """What an install or rollback did, for the person who ran it."""
    if not change.changed:
        return [f"{change.current.name} (bundle {change.current.meta_sha256[:12]}) is installed already: nothing "
                "changed"]
    lines = [*(["checked: " + change.smoke.text] if change.smoke else []), *change.current.lines("current"),
             *(change.previous.lines("previous") if change.previous else ["previous: none"])]
    return lines + ["the daemon counts with the current bundle from its next specimen; a specimen being counted "
                    "finishes on the bundle it started with"]


def status_lines(models: Models, fallback: Path | None) -> list[str]:
    """`model status`: the installed and previous bundles and the latest changes."""
    current, previous = models.current(), models.previous()
    if current is None:
        lines = [f"no bundle installed in {models.root}: the daemon counts with {fallback or 'model.bundle'}"]
    else:
        lines = current.lines("current")
    lines += previous.lines("previous") if previous else ["previous: none"]
    history = models.history(5)
    if history:
        lines.append("latest changes:")
        lines += [f"  {h.get('at')} {h.get('action')} by {h.get('user')}: {h.get('current', {}).get('name')} "
                  f"(bundle {str(h.get('current', {}).get('meta_sha256'))[:12]})" for h in history]
    return lines
