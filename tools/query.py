"""query_table: read-only SQL over CSV / Parquet / JSON files of the store, with DuckDB.

The named files are read THROUGH THE GATEWAY with the caller's principal (so path rules,
QoS, audit and masking apply: a column of masked values arrives masked), parsed by
pyarrow into Arrow tables, and registered as views in a fresh in-memory DuckDB connection
that is then sealed: external access off (no files, no URLs, no ATTACH/COPY), extension
autoloading and installing off, Python replacement scans off, configuration locked. Only
one SELECT statement is accepted; it is interrupted after a timeout and its rows capped.
"""

import base64
import datetime as dt
import decimal
import io
import json
import math
import re
import threading
import time
import uuid
from typing import Annotated, Any

import anyio
from pydantic import BaseModel, Field

from storage import paths

from .common import MiB, governance_of, governed_tool, limit, max_reply_bytes, report
from .registry import ToolContext, ToolError

DEFAULT_ROWS = 1000
MAX_ROWS = 10_000
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 60.0
DEFAULT_MAX_TABLE_BYTES = 64 * MiB  # ctx.limits['max_table_bytes']: per file
MAX_TABLES = 16
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
           ".json": "json", ".jsonl": "json", ".ndjson": "json"}
RESERVED = {"select", "from", "where", "table", "order", "group", "by", "join", "union",
            "with", "limit", "as", "on", "and", "or", "not", "null", "values", "query"}


class Column(BaseModel):
    name: str
    type: str = Field(description="DuckDB type of the column")


class TableLoaded(BaseModel):
    name: str = Field(description="The view name usable in SQL")
    path: str
    format: str
    rows: int
    version: int
    labels: list[str] = Field(description="PII entity types the file holds")
    masked: list[str] = Field(description="Entity types masked for your role in this table")


class QueryTableResult(BaseModel):
    columns: list[Column]
    rows: list[list[Any]] = Field(description="Result rows, values in column order")
    row_count: int
    truncated: bool = Field(description="True when more rows exist than returned (row limit "
                                        "or reply size cap)")
    tables: list[TableLoaded]
    masked: list[str] = Field(description="Entity types masked in any input table")
    elapsed_ms: float


def _json_safe(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return str(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return "base64:" + base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    return str(v)


def _parse(fmt: str, data: bytes, path: str) -> Any:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    try:
        if fmt in ("csv", "tsv"):
            opts = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
            return pcsv.read_csv(io.BytesIO(data), parse_options=opts)
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(data))
        head = data.lstrip()[:1]
        if head == b"[":  # one JSON array of objects
            rows = json.loads(data)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ValueError("a JSON array must hold objects (one per row)")
            return pa.Table.from_pylist(rows)
        return pjson.read_json(io.BytesIO(data))  # newline-delimited JSON objects
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds; all mean 'bad input'
        msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ToolError("invalid_argument",
                        f"{path} could not be parsed as {fmt.upper()}: {msg}") from None


def _check_sql(sql: str) -> None:
    import duckdb

    try:
        stmts = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ToolError("invalid_argument", f"SQL does not parse: {_first_line(exc)}") from None
    if len(stmts) != 1:
        raise ToolError("invalid_argument",
                        f"give exactly one SQL statement (got {len(stmts)}); a single SELECT "
                        "over the tables you name in `tables`")
    kind = stmts[0].type
    if kind != duckdb.StatementType.SELECT:
        raise ToolError("forbidden",
                        f"only a read-only SELECT is allowed, not {kind.name}: query_table "
                        "refuses COPY, ATTACH, INSTALL/LOAD, SET, PRAGMA, CREATE, INSERT and "
                        "the like")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _run(tables: dict[str, Any], sql: str, row_limit: int, timeout: float
         ) -> tuple[list[Column], list[tuple], bool]:
    import duckdb

    con = duckdb.connect(":memory:", config={"threads": 2, "memory_limit": "1GB"})
    timer: threading.Timer | None = None
    try:
        for setting in ("SET autoinstall_known_extensions = false",
                        "SET autoload_known_extensions = false",
                        "SET allow_community_extensions = false",
                        "SET python_enable_replacements = false"):
            con.execute(setting)
        for name, table in tables.items():
            con.register(name, table)
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        timer = threading.Timer(timeout, con.interrupt)
        timer.daemon = True
        timer.start()
        try:
            cur = con.execute(sql)
            desc = cur.description or []
            rows = cur.fetchmany(row_limit + 1) if desc else []
        except duckdb.InterruptException:
            raise ToolError("timeout", f"the query ran over {timeout:g} s and was stopped; "
                                       "filter or aggregate more, or raise timeout_s") from None
        except duckdb.PermissionException as exc:
            raise ToolError("forbidden",
                            "query_table reads only the tables you name in `tables`; files, "
                            "URLs and extensions of the host are off limits "
                            f"({_first_line(exc)}). Name store files in `tables`, e.g. "
                            "tables={'t': '/data/x.csv'}") from None
        except duckdb.CatalogException as exc:
            raise ToolError("invalid_argument",
                            f"{_first_line(exc)}; the tables available are: "
                            f"{', '.join(sorted(tables)) or '(none)'}") from None
        except duckdb.Error as exc:
            raise ToolError("invalid_argument", f"query failed: {_first_line(exc)}") from None
        columns = [Column(name=str(d[0]), type=str(d[1])) for d in desc]
        more = len(rows) > row_limit
        return columns, rows[:row_limit], more
    finally:
        if timer is not None:
            timer.cancel()
        con.close()


@governed_tool(
    "query_table",
    "Run one read-only SQL SELECT (DuckDB dialect) over CSV, TSV, Parquet or JSON files in "
    "your store. Name each file as a table: tables={'sales': '/data/sales.csv'}, then "
    "`SELECT region, sum(amount) FROM sales GROUP BY region`. The format comes from the "
    "extension (.csv .tsv .parquet .pq .json .jsonl .ndjson). Files are read with your "
    "role, so PII you are not cleared for arrives masked. Returns at most `limit` rows "
    "(default 1000, max 10000) and stops after timeout_s. No other SQL: reading host "
    "files or URLs, COPY, ATTACH, INSTALL/LOAD, SET and PRAGMA are refused.",
    read_only=True, idempotent=True, title="Query table files with SQL")
async def query_table(
    ctx: ToolContext,
    sql: Annotated[str, Field(description="One SELECT statement over the named tables",
                              min_length=1, max_length=100_000)],
    tables: Annotated[dict[str, str], Field(
        description="Table name -> file path, e.g. {'sales': '/data/sales.csv'}; names are "
                    "SQL identifiers (letters, digits, '_')",
        min_length=1, max_length=MAX_TABLES)],
    limit: Annotated[int, Field(description="Maximum rows returned (1-10000)", ge=1,
                                le=MAX_ROWS)] = DEFAULT_ROWS,
    timeout_s: Annotated[float, Field(description="Stop the query after this many seconds "
                                                  "(0.1-60)", ge=0.1,
                                      le=MAX_TIMEOUT_S)] = DEFAULT_TIMEOUT_S,
) -> QueryTableResult:
    t0 = time.perf_counter()
    for name in tables:
        if not NAME.match(name) or name.lower() in RESERVED:
            raise ToolError("invalid_argument",
                            f"table name {name!r} must be a plain SQL identifier (a letter or "
                            "'_', then letters, digits, '_'; not a keyword), e.g. 'sales'")
    first = next(iter(tables.values()))
    async with ctx.gateway.audited(ctx.principal, "query_table", first) as event:
        result = await _query(ctx, sql, tables, limit, timeout_s, t0)
        event.labels = sorted({lab for t in result.tables for lab in t.labels})
        if result.masked:
            event.decision = "masked"
    return result


async def _query(ctx: ToolContext, sql: str, tables: dict[str, str], limit: int,
                 timeout_s: float, t0: float) -> QueryTableResult:
    await anyio.to_thread.run_sync(_check_sql, sql)
    cap = int(_table_cap(ctx))
    loaded: dict[str, Any] = {}
    infos: list[TableLoaded] = []
    n = len(tables) + 1
    for i, (name, path) in enumerate(tables.items()):
        await report(ctx, i, n, f"loading {path} as {name}")
        norm = paths.normalize(path)
        ext = norm[norm.rfind("."):].lower() if "." in norm.rsplit("/", 1)[-1] else ""
        fmt = FORMATS.get(ext)
        if fmt is None:
            raise ToolError("invalid_argument",
                            f"{norm}: unknown table format {ext or '(no extension)'}; "
                            f"supported: {', '.join(sorted(FORMATS))}")
        res = await ctx.gateway.aread(ctx.principal, norm, 0, cap)
        if res.next_offset is not None:
            raise ToolError("too_large",
                            f"{norm} is over the {cap // MiB} MiB a query_table input may have; "
                            "query a smaller extract")
        table = await anyio.to_thread.run_sync(_parse, fmt, res.data, norm)
        loaded[name] = table
        labels, _red = governance_of(res.info.attrs)
        infos.append(TableLoaded(name=name, path=res.info.path, format=fmt, rows=table.num_rows,
                                 version=res.info.version, labels=labels,
                                 masked=list(res.masked)))
    await report(ctx, n - 1, n, "running the query")
    columns, rows, more = await anyio.to_thread.run_sync(_run, loaded, sql, limit, timeout_s)
    budget = max_reply_bytes(ctx)
    out: list[list[Any]] = []
    used = 0
    for r in rows:
        row = [_json_safe(v) for v in r]
        used += len(json.dumps(row, default=str)) + 1
        if used > budget and out:
            more = True
            break
        out.append(row)
    await report(ctx, n, n, f"{len(out)} rows")
    masked = sorted({m for t in infos for m in t.masked})
    return QueryTableResult(columns=columns, rows=out, row_count=len(out), truncated=more,
                            tables=infos, masked=masked,
                            elapsed_ms=round((time.perf_counter() - t0) * 1000.0, 1))


def _table_cap(ctx: ToolContext) -> int:
    return int(limit(ctx, "max_table_bytes", DEFAULT_MAX_TABLE_BYTES))


__all__ = ["query_table", "QueryTableResult"]
