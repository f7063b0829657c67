"""The tuning database: the tile chosen per GEMM problem for each host, read by the kernel providers.

``<dir>/tuning.json`` holds one record per (host target key, kernel-source hash, problem)
(:func:`fraccompile.targets.kernels.gemm.source_hash`), written atomically under a lock, so later
runs reuse it and a second ``fraccompile tune`` call only measures problems it has not seen. The
search that fills it is :mod:`fraccompile.targets.tools.tuning`; :class:`~.library.JitKernels`
builds each GEMM with the tile recorded here for its problem.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import asdict, dataclass

from ... import fileio
from ..kernels import gemm
from .host import HostTarget

DB_FILE = "tuning.json"
FORMAT = 1


class TuningDBError(ValueError):
    """A tuning database that cannot be read (damaged or of another format)."""


@dataclass
class TuneRecord:
    host: str
    source: str
    problem: tuple[int, int, int, int]
    tile: tuple[int, int, int]
    default_tile: tuple[int, int, int]
    gops: float
    default_gops: float
    trials: int
    seconds: float

    @property
    def speedup(self) -> float:
        return self.gops / self.default_gops if self.default_gops else 1.0


def _key(host_key: str, source: str, problem) -> str:
    return f"{host_key}|{source}|{','.join(map(str, problem))}"


class TuningDB:
    """The tiles chosen per GEMM problem for each host (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        self.path = self.directory / DB_FILE
        self.records: dict[str, TuneRecord] = self._read()

    def _read(self) -> dict[str, TuneRecord]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                raise TuningDBError(f"format {data.get('format')!r}, this fraccompile reads {FORMAT}")
            out = {}
            for r in data["records"]:
                rec = TuneRecord(
                    **{
                        **r,
                        "problem": tuple(r["problem"]),
                        "tile": tuple(r["tile"]),
                        "default_tile": tuple(r["default_tile"]),
                    }
                )
                gemm.Tile(*rec.tile)  # validates
                out[_key(rec.host, rec.source, rec.problem)] = rec
            return out
        except TuningDBError as e:
            raise TuningDBError(f"tuning database {self.path}: {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise TuningDBError(
                f"tuning database {self.path} is damaged ({type(e).__name__}: {e}); delete it to start over"
            ) from None

    def get(self, host: HostTarget, problem) -> TuneRecord | None:
        return self.records.get(_key(host.key, gemm.source_hash(), tuple(problem)))

    def tile(self, host: HostTarget, problem) -> gemm.Tile | None:
        rec = self.get(host, problem)
        return gemm.Tile(*rec.tile) if rec is not None else None

    def put(self, rec: TuneRecord) -> None:
        """Add ``rec`` and write the database (merged with what other processes wrote since)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fileio.remove_stale_temps(self.directory, DB_FILE)  # of writers killed mid-write
        with fileio.locked(self.path):
            self.records = {**self._read(), **self.records}
            self.records[_key(rec.host, rec.source, rec.problem)] = rec
            data = {"format": FORMAT, "records": [asdict(r) for r in self.records.values()]}
            fileio.atomic_write(self.path, json.dumps(data, indent=1))
