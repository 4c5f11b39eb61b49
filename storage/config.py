"""Store configuration: one YAML file, ``lodestore.yaml``, in the store's home.

Every server replica and worker reads the same file, so they all compute the same
virtual-shard map and fragment placement: there is no master to ask.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

CONFIG_NAME = "lodestore.yaml"
MiB = 1024 * 1024
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 4096, 256 * MiB  # store-wide and per-write chunk sizes


def one_line(exc: BaseException) -> str:
    """A parser's multi-line message as one line (CLI errors are one line)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def default_home() -> Path:
    env = os.environ.get("LODESTORE_HOME")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_data_dir("lodestore", appauthor=False))


@dataclass
class TargetSpec:
    id: str
    url: str


@dataclass
class StoreConfig:
    home: str
    k: int = 4
    m: int = 6
    chunk_size: int = 4 * MiB
    inline_threshold: int = 64 * 1024
    # 4 KiB: a 4 KiB random read fetches 4 KiB + 8 (16 KiB blocks made it read 16 KiB)
    checksum_block: int = 4 * 1024
    durability: str = "fsync"
    # folder targets write fragments of 128 KiB+ with O_DIRECT (see targets/local.py);
    # false: through the page cache
    direct_writes: bool = True
    virtual_shards: int = 64
    engines: list[str] = field(default_factory=list)
    shard_map: list[int] = field(default_factory=list)  # virtual shard -> engine index
    control: str = ""
    targets: list[TargetSpec] = field(default_factory=list)
    dir_cache_ttl: float = 1.0
    gc_grace_seconds: float = 3600.0
    io_threads: int = 24
    write_concurrency: int = 4
    readahead: int = 8
    # KV tier (sessions, memories): '' is the embedded SQLite file kv.db in the home
    kv: str = ""

    def kv_url(self) -> str:
        return self.kv or f"sqlite:///{Path(self.home) / 'kv.db'}"

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{CONFIG_NAME}: {name} {why}")

        if not 1 <= self.k <= self.m <= 256:
            raise bad("k/m", f"must satisfy 1 <= k <= m <= 256 (got k={self.k}, m={self.m})")
        if len(self.targets) < self.m:
            raise bad("targets", f"needs at least m={self.m} targets, has {len(self.targets)}")
        ids = [t.id for t in self.targets]
        if len(set(ids)) != len(ids):
            raise bad("targets", f"ids must be unique, got {ids}")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise bad("chunk_size", "must be between 4 KiB and 256 MiB")
        if self.checksum_block < 512 or self.checksum_block > 1024 * 1024:
            raise bad("checksum_block", "must be between 512 B and 1 MiB")
        if self.inline_threshold < 0 or self.inline_threshold > 1024 * 1024:
            raise bad("inline_threshold", "must be between 0 and 1 MiB")
        if self.durability not in ("fsync", "none"):
            raise bad("durability", "must be 'fsync' or 'none'")
        if not isinstance(self.direct_writes, bool):
            raise bad("direct_writes", "must be true or false")
        if not self.engines:
            raise bad("engines", "must list at least one metadata engine URL")
        if len(self.shard_map) != self.virtual_shards:
            raise bad("shard_map", f"must map all {self.virtual_shards} virtual shards")
        if any(not 0 <= e < len(self.engines) for e in self.shard_map):
            raise bad("shard_map", "refers to an engine that is not listed")

    @classmethod
    def embedded(cls, home: Path, engines: int = 4, **overrides) -> StoreConfig:
        """The laptop default: SQLite files and six local folders under ``home``."""
        home = Path(home).resolve()
        vshards = overrides.pop("virtual_shards", 64)
        m = overrides.get("m", 6)
        cfg = cls(
            home=str(home),
            virtual_shards=vshards,
            engines=[f"sqlite:///{home / 'meta' / f'meta-{i}.db'}" for i in range(engines)],
            shard_map=[v % engines for v in range(vshards)],
            control=f"sqlite:///{home / 'control.db'}",
            targets=[
                TargetSpec(f"t{i}", (home / "targets" / f"t{i}").as_uri())
                for i in range(max(m, 6))
            ],
            **overrides,
        )
        return cfg

    def to_yaml(self) -> str:
        data = asdict(self)
        data.pop("home")
        return yaml.safe_dump(data, sort_keys=False)

    def save(self) -> None:
        path = Path(self.home) / CONFIG_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)

    @classmethod
    def load(cls, home: Path) -> StoreConfig:
        path = Path(home) / CONFIG_NAME
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(
                f"no store at {home}: run `lodestore init` (or set LODESTORE_HOME)"
            ) from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {one_line(exc)}") from None
        known = {f for f in cls.__dataclass_fields__ if f != "home"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{path}: unknown settings {sorted(unknown)}; allowed: {sorted(known)}")
        targets = [TargetSpec(**t) for t in data.pop("targets", [])]
        cfg = cls(home=str(Path(home).resolve()), targets=targets, **data)
        cfg.validate()
        return cfg
