"""Exact and near-duplicate detection across every input of a prepare run, with its state in SQLite.

A row is checked against every unique row seen before it, in arrival order, so the first occurrence
wins and `duplicate_of` names it. Only unique rows are registered; duplicates leave no trace.

- Exact: a 16-byte BLAKE2b digest of `normalise_for_dedup(text)` (casefold, whitespace collapsed,
  stripped), so case and spacing variants are exact duplicates.
- Near: MinHash over word n-gram shingles of the same normalised text (`shingle_words`, 5 by
  default), banded for LSH with the (bands, rows) pair datasketch's optimiser picks for the threshold
  (weighted against misses, see FALSE_NEGATIVE_WEIGHT). Rows sharing a band are candidates; a
  candidate counts only when the Jaccard estimated from the stored signatures is >= `threshold`, and
  the earliest registered one wins. Each changed word alters up to n shingles, so with 5-word
  shingles a 100-word text with 1 changed word has Jaccard 0.90, 2 scattered changes 0.81, 3: 0.73.
- A text shorter than `shingle_words` words is one shingle: the whole text. Two such texts are near
  duplicates only if identical (which exact hashing catches first when it is on).
- Empty (or whitespace-only) text gets no special case: it normalises to "", its one shingle is the
  empty word sequence, so a second empty row is a duplicate of the first. (The pipeline rejects
  empty rows before dedup anyway.)

The MinHash is datasketch's "affine32" scheme (datasketch 2.x: murmur3 finalizer, then
`a * h + b mod 2**32` with the permutations of `MinHash(num_perm, seed=1)`), computed for a whole
chunk of rows at once in numpy; datasketch itself is not needed at run time (the tests compare
against it). Shingle hashes come from per-word polynomial hashes over UTF-8 bytes, computed with
prefix sums, combined per n-gram: no Python call per word or shingle, which is what makes ~100-word
rows fast enough. Everything is a pure function of the text, with no Python `hash()` (salted per
process), so results are identical across processes and runs.

State, in the caller's connection (tables `dedup_*`): one row per unique row (its id, its registration
order `seq` and its signature as uint32 bytes), exact digests, LSH band keys (indexed, see MERGE_ROWS).
What grows is kept in SQLite, so memory stays flat as the dataset grows, bounded by SQLite's page cache
(CACHE_KIB), one chunk of rows (CHUNK_ROWS, CHUNK_CHARS) and a fixed-size bitset of the band keys
stored (FILTER_BITS), which lets most rows skip the index lookups: a key whose bit is clear has no
stored row. Transactions are the caller's: nothing here commits. The pipeline may commit rows checked
after the ones it has written out; `last_seq` tells it where its own rows end, and `forget_after` cuts
a resumed state back to that point. Keep `PRAGMA mmap_size` at 0 (the default) on this connection, or
mapped pages count toward RSS as the database grows.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from hashlib import blake2b

import numpy as np

from forge.contract.plan import DedupSpec
from forge.errors import DataError

Verdict = tuple[str, str | None]

FORMAT = 1  # bump when hashing or tables change: a state from another format is refused, not misread
SEED = 1  # datasketch's default seed; the permutations are a pure function of it
CACHE_KIB = 32 * 1024  # SQLite page cache for this connection, the bound on the state's resident size
CHUNK_ROWS = 1024  # rows sketched and looked up together; with CHUNK_CHARS, bounds memory for any batch
CHUNK_CHARS = 2_000_000
# Band keys are random, so inserting them straight into a band index much larger than the page cache
# dirties a different page per key, and every shard rewrites most of the index. They go to a small
# `dedup_band_recent` instead, merged into `dedup_band` in key order (one pass over it) whenever it
# holds this many rows' keys. Lookups read both; the split is invisible in the results.
MERGE_ROWS = 100_000
SHINGLES_PER_BLOCK = 4096  # shingles x num_perm uint32 values alive at once while sketching
# LSH weights for datasketch's (bands, rows) optimisation. MinHashLSH weighs both 0.5, which at 0.8
# makes a pair with Jaccard 0.85 a candidate only 69% of the time. A false positive here costs one
# signature comparison (every candidate is verified), a false negative is a duplicate kept, so
# misses weigh 0.9: at 0.8 / 128 permutations that gives 14 bands of 9 instead of 9 of 13.
FALSE_POSITIVE_WEIGHT = 0.1
FALSE_NEGATIVE_WEIGHT = 0.9
FILTER_BITS = 28  # 2**28 bits (32 MiB): about 1% of lookups pass by chance at 100k rows, 5% at 1M
_SQL_VARS = 500  # values per IN (...) query, under every SQLite's variable limit
_INSERT_ROWS = 100  # rows per multi-row INSERT (<= 999 variables for any SQLite)
_WORD_SPAN = 1 << 18  # bytes of text whose words are hashed together (bounds the prefix-sum arrays)
_LONG_WORD = 4096  # longer "words" (a base64 blob, say) are hashed one at a time with BLAKE2b

_U64 = np.uint64
_POLY = _U64(0x100000001B3)  # FNV-1a 64 prime: odd, so each n-gram position multiplies bijectively
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dedup_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS dedup_row (seq INTEGER PRIMARY KEY, row_id TEXT NOT NULL, sig BLOB)",
    "CREATE TABLE IF NOT EXISTS dedup_exact (digest BLOB PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS dedup_band (key INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (key, seq))"
    " WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS dedup_band_recent (key INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (key, seq))"
    " WITHOUT ROWID",
)


def normalise_for_dedup(text: str) -> str:
    """What exact hashing and shingling see: casefolded, whitespace runs collapsed to one space, stripped."""
    return " ".join(text.casefold().split())


@lru_cache(maxsize=64)
def band_params(threshold: float, num_perm: int, false_positive_weight: float = FALSE_POSITIVE_WEIGHT,
                false_negative_weight: float = FALSE_NEGATIVE_WEIGHT) -> tuple[int, int]:
    """(bands, rows per band) minimising the weighted false positive + false negative probabilities at
    `threshold`: what `datasketch.lsh._optimal_param(threshold, num_perm, fp_weight, fn_weight)` returns.

    datasketch integrates with scipy's `quad`; the integrands are polynomials of degree b*r <= num_perm,
    so Gauss-Legendre with num_perm//2 + 1 nodes integrates them exactly, without scipy. Ties go to
    the smallest b, then the smallest r, as in datasketch's loop.
    """
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def integral(lo: float, hi: float, false_positive: bool) -> np.ndarray:
        s = (hi - lo) / 2 * nodes + (hi + lo) / 2
        p = 1 - (1 - s[None, :] ** pairs[:, 1:2]) ** pairs[:, 0:1]  # P(candidate) at similarity s
        return ((p if false_positive else 1 - p) @ weights) * (hi - lo) / 2

    error = (false_positive_weight * integral(0.0, threshold, True)
             + false_negative_weight * integral(threshold, 1.0, False))
    b, r = pairs[int(np.argmin(error))]
    return int(b), int(r)


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


def _word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the words of normalised texts, concatenated, and each text's word count.

    A word's hash is the polynomial sum(byte_i + 1) * P**i mod 2**64 over its UTF-8 bytes, mixed with its
    length; prefix sums compute it for every word of the batch at once instead of one call per word.
    (After normalisation words are separated by exactly one space, and 0x20 never occurs inside a
    multi-byte UTF-8 character.)
    """
    data = np.frombuffer(" ".join(texts).encode("utf-8", "surrogatepass"), dtype=np.uint8)
    spaces = np.flatnonzero(data == 32)
    starts = np.concatenate(([0], spaces + 1))
    ends = np.concatenate((spaces, [len(data)]))
    tokens = np.fromiter((text.count(" ") + 1 for text in texts), dtype=np.int64, count=len(texts))
    present = np.fromiter(map(bool, texts), dtype=bool, count=len(texts))  # "" is one empty token, no word
    keep = np.repeat(present, tokens)
    starts, ends = starts[keep], ends[keep]
    out = np.empty(len(starts), dtype=_U64)
    lengths = ends - starts
    i = 0
    while i < len(starts):
        if lengths[i] > _LONG_WORD:
            out[i] = int.from_bytes(blake2b(data[starts[i] : ends[i]].tobytes(), digest_size=8).digest(), "little")
            i += 1
            continue
        # words ending within _WORD_SPAN bytes of this one's start, up to the next long word
        j = max(int(np.searchsorted(ends, starts[i] + _WORD_SPAN, side="right")), i + 1)
        long_words = np.flatnonzero(lengths[i:j] > _LONG_WORD)
        j = i + int(long_words[0]) if len(long_words) else j
        lo, hi = starts[i], ends[j - 1]
        powers, inverse_powers = _powers()
        prefix = np.zeros(hi - lo + 1, dtype=_U64)
        np.cumsum((data[lo:hi].astype(_U64) + _U64(1)) * powers[: hi - lo], out=prefix[1:])
        s, e = starts[i:j] - lo, ends[i:j] - lo
        out[i:j] = _fmix64((prefix[e] - prefix[s]) * inverse_powers[s] ^ (e - s).astype(_U64) * _U64(_GOLDEN))
        i = j
    return out, np.where(present, tokens, 0)


@lru_cache(maxsize=1)
def _powers() -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i mod 2**64 for i in 0.._WORD_SPAN (4 MiB in all, computed once per process)."""
    powers = np.ones(_WORD_SPAN + 1, dtype=_U64)
    inverse = np.ones(_WORD_SPAN + 1, dtype=_U64)
    np.cumprod(np.full(_WORD_SPAN, _POLY), out=powers[1:])
    np.cumprod(np.full(_WORD_SPAN, _U64(pow(int(_POLY), -1, 1 << 64))), out=inverse[1:])
    return powers, inverse


def _digest(normalised: str) -> bytes:
    return blake2b(normalised.encode("utf-8", "surrogatepass"), digest_size=16, person=b"forge-dedup").digest()


class _Sketcher:
    """MinHash signatures and LSH band keys for batches of normalised texts, vectorised in numpy."""

    def __init__(self, num_perm: int, shingle_words: int, bands: int, rows_per_band: int) -> None:
        self.num_perm, self.n, self.bands, self.rows_per_band = num_perm, shingle_words, bands, rows_per_band
        # datasketch 2.x MinHash(num_perm, seed=SEED).permutations for the affine32 scheme, drawn the same way.
        gen = np.random.RandomState(SEED)
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        self.a, self.b = a[:, None], b[:, None]
        self.powers = [_U64(pow(int(_POLY), self.n - 1 - k, 1 << 64)) for k in range(self.n)]

    def shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hashes of every text's shingles, concatenated, and how many belong to each text (>= 1)."""
        w, lengths = _word_hashes(texts)

        n = self.n
        full = lengths >= n
        counts = np.where(full, lengths - n + 1, 1)
        ends = np.cumsum(counts)
        total = int(ends[-1]) if len(counts) else 0
        poly = np.zeros(total, dtype=_U64)
        width = np.where(full, n, lengths).astype(_U64)
        first_words = np.cumsum(lengths) - lengths
        if full.any():
            # every window of n consecutive words in the flat list, Horner-style, then keep those inside a row
            windows = np.zeros(max(len(w) - n + 1, 0), dtype=_U64)
            for k, power in enumerate(self.powers):
                windows += w[k : k + len(windows)] * power
            slot = np.arange(total) - np.repeat(ends - counts, counts)
            mask = np.repeat(full, counts)
            poly[mask] = windows[(np.repeat(first_words, counts) + slot)[mask]]
        for i in np.flatnonzero(~full):  # fewer than n words: the whole text is the one shingle
            acc = 0
            for word in w[first_words[i] : first_words[i] + lengths[i]].tolist():
                acc = (acc * int(_POLY) + word) & _MASK64
            poly[ends[i] - 1] = acc
        lengths_mix = np.repeat(width, counts) * _U64(_GOLDEN)
        return (_fmix64(poly ^ lengths_mix) & _U64(0xFFFFFFFF)).astype(np.uint32), counts

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32: datasketch's MinHash(num_perm, seed=1, hashfunc=identity)
        `update_batch`ed with each text's shingle hashes."""
        hashes, counts = self.shingle_hashes(texts)
        mixed = _fmix32(hashes)
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        starts = np.cumsum(counts) - counts
        ends = starts + counts
        i = 0
        while i < len(texts):  # blocks of whole texts, about SHINGLES_PER_BLOCK shingles each
            j = max(int(np.searchsorted(ends, starts[i] + SHINGLES_PER_BLOCK, side="right")), i + 1)
            lo, hi = starts[i], ends[j - 1]
            if hi - lo <= SHINGLES_PER_BLOCK or j - i > 1:
                permuted = self.a * mixed[None, lo:hi]
                permuted += self.b
                out[i:j] = np.minimum.reduceat(permuted, starts[i:j] - lo, axis=1).T
            else:  # one long text: fold its shingles in block by block
                out[i] = np.uint32(0xFFFFFFFF)
                for s in range(lo, hi, SHINGLES_PER_BLOCK):
                    block = mixed[None, s : min(s + SHINGLES_PER_BLOCK, hi)]
                    np.minimum(out[i], (self.a * block + self.b).min(axis=1), out=out[i])
            i = j
        return out

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(rows, bands) int64: a 64-bit hash of each band's values and its index (SQLite INTEGER range)."""
        used = signatures[:, : self.bands * self.rows_per_band].reshape(len(signatures), self.bands, self.rows_per_band)
        acc = np.zeros((len(signatures), self.bands), dtype=_U64)
        for k in range(self.rows_per_band):
            acc = acc * _POLY + used[:, :, k].astype(_U64)
        acc ^= (np.arange(1, self.bands + 1, dtype=_U64) * _U64(_GOLDEN))[None, :]
        return _fmix64(acc).view(np.int64)


def _earlier_rows_sharing_a_key(keys: np.ndarray) -> dict[int, list[int]]:
    """For each row that shares a band key with earlier rows of the same chunk, those rows in order."""
    flat = keys.ravel()
    order = np.argsort(flat, kind="stable")
    same = flat[order][1:] == flat[order][:-1]
    if not same.any():
        return {}
    in_group = np.zeros(len(flat), dtype=bool)
    in_group[1:] |= same
    in_group[:-1] |= same
    rows_by_key: dict[int, list[int]] = {}
    for position in np.sort(order[in_group]).tolist():  # row-major: earlier rows first
        rows_by_key.setdefault(int(flat[position]), []).append(position // keys.shape[1])
    earlier: dict[int, set[int]] = {}
    for rows in rows_by_key.values():
        for k, row in enumerate(rows):
            if k:
                earlier.setdefault(row, set()).update(r for r in rows[:k] if r != row)
    return {row: sorted(found) for row, found in earlier.items() if found}


def _insert_many(cur: sqlite3.Cursor, into: str, values: list, width: int) -> None:
    """`INSERT {into} VALUES` for rows of `width` values laid end to end in `values`: executemany, but
    _INSERT_ROWS rows per statement (about 3x faster for narrow rows), from slices of one flat list."""
    placeholders = "(" + ",".join("?" * width) + ")"
    step = _INSERT_ROWS * width
    full = len(values) - len(values) % step
    if full:
        statement = f"INSERT {into} VALUES " + ",".join([placeholders] * _INSERT_ROWS)
        cur.executemany(statement, (values[i : i + step] for i in range(0, full, step)))
    if len(values) > full:
        cur.execute(f"INSERT {into} VALUES " + ",".join([placeholders] * ((len(values) - full) // width)),
                    values[full:])


@dataclass(frozen=True)
class Sketches:
    """What dedup needs of a batch of texts, computed without the state: exact digests (when exact is on),
    MinHash signatures and their LSH band keys (when near is on)."""

    digests: list[bytes]
    signatures: np.ndarray | None
    keys: np.ndarray | None


class Sketcher:
    """The pure half of dedup: a function of the texts and the spec alone, no state."""

    def __init__(self, spec: DedupSpec) -> None:
        self.spec = spec
        self.bands, self.rows_per_band = band_params(spec.threshold, spec.num_perm) if spec.near else (0, 0)
        self._minhash = (_Sketcher(spec.num_perm, spec.shingle_words, self.bands, self.rows_per_band)
                         if spec.near else None)

    def sketch(self, texts: Sequence[str]) -> Sketches:
        """Sketches of one chunk (keep it to about CHUNK_ROWS rows and CHUNK_CHARS characters)."""
        normalised = [normalise_for_dedup(text) for text in texts]
        digests = [_digest(text) for text in normalised] if self.spec.exact else []
        if not self.spec.near:
            return Sketches(digests, None, None)
        signatures = self._minhash.signatures(normalised)
        return Sketches(digests, signatures, self._minhash.band_keys(signatures))


class _KeyFilter:
    """A bitset over band keys: a clear bit means no stored row has that key (set bits may be chance)."""

    def __init__(self, bits: int | None = None) -> None:
        bits = bits or FILTER_BITS
        self._mask = np.uint64((1 << bits) - 1)
        self._bytes = np.zeros(1 << (bits - 3), dtype=np.uint8)

    def _slots(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = keys.view(np.uint64) & self._mask
        return (index >> np.uint64(3)).astype(np.int64), (np.uint8(1) << (index & np.uint64(7)).astype(np.uint8))

    def add(self, keys: np.ndarray) -> None:
        where, bit = self._slots(keys)
        np.bitwise_or.at(self._bytes, where, bit)

    def may_contain(self, keys: np.ndarray) -> np.ndarray:
        where, bit = self._slots(keys)
        return (self._bytes[where] & bit) != 0


class Deduplicator:
    """First-occurrence-wins dedup whose state lives in `db`; see the module docstring."""

    def __init__(self, db: sqlite3.Connection, spec: DedupSpec) -> None:
        self._db = db
        self._spec = spec
        self.sketcher = Sketcher(spec)
        bands, rows_per_band = self.sketcher.bands, self.sketcher.rows_per_band
        cur = self._cursor()
        cur.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        for statement in _SCHEMA:
            cur.execute(statement)
        wanted = {"format": FORMAT, "seed": SEED, "bands": bands, "rows_per_band": rows_per_band,
                  **spec.model_dump(mode="json")}
        stored = cur.execute("SELECT value FROM dedup_meta WHERE key = 'spec'").fetchone()
        if stored is None:
            cur.execute("INSERT INTO dedup_meta (key, value) VALUES ('spec', ?)", (json.dumps(wanted, sort_keys=True),))
        elif json.loads(stored[0]) != wanted:
            where = next((row[2] for row in cur.execute("PRAGMA database_list") if row[1] == "main" and row[2]),
                         "this database")
            raise DataError(
                f"The dedup state in {where} was built with other settings ({stored[0]}), not these "
                f"({json.dumps(wanted, sort_keys=True)}): rows checked under other settings cannot be compared.",
                "Rerun with `forge prepare --rebuild` to start this dataset over (it discards the partial output), "
                "or delete that file; or use the dedup settings it was built with.")
        self.last_seq = cur.execute("SELECT COALESCE(MAX(seq), 0) FROM dedup_row").fetchone()[0]
        self._filter = self._load_filter(cur) if spec.near else None

    def forget_after(self, seq: int) -> None:
        """Unregister every row after `seq`, as if they had never been checked (a resumed run's rows that
        were committed ahead of their shard)."""
        cur = self._cursor()
        for table in ("dedup_row", "dedup_exact", "dedup_band", "dedup_band_recent"):
            cur.execute(f"DELETE FROM {table} WHERE seq > ?", (seq,))
        self.last_seq = min(self.last_seq, seq)
        self._filter = self._load_filter(cur) if self._spec.near else None

    @staticmethod
    def _load_filter(cur: sqlite3.Cursor) -> _KeyFilter:
        keys = _KeyFilter()
        cur.execute("SELECT key FROM dedup_band UNION ALL SELECT key FROM dedup_band_recent")
        while batch := cur.fetchmany(1 << 16):
            keys.add(np.array(batch, dtype=np.int64).ravel())
        return keys

    def check(self, row_id: str, text: str) -> Verdict:
        """("unique", None), ("exact", first_row_id) or ("near", first_row_id); a unique row is registered."""
        return self.check_batch([(row_id, text)])[0]

    def check_batch(self, items: list[tuple[str, str]]) -> list[Verdict]:
        """The verdicts `check` would give for each item in order (duplicates within the batch included)."""
        if not (self._spec.exact or self._spec.near):
            return [("unique", None)] * len(items)
        verdicts: list[Verdict] = []
        start = 0
        while start < len(items):  # chunks of at most CHUNK_ROWS rows and (one row aside) CHUNK_CHARS characters
            end, chars = start + 1, len(items[start][1])
            while end < min(start + CHUNK_ROWS, len(items)) and chars + len(items[end][1]) <= CHUNK_CHARS:
                chars += len(items[end][1])
                end += 1
            chunk = items[start:end]
            verdicts.extend(self.check_sketched([row_id for row_id, _ in chunk],
                                                self.sketcher.sketch([text for _, text in chunk])))
            start = end
        return verdicts

    def _cursor(self) -> sqlite3.Cursor:
        cur = self._db.cursor()
        cur.row_factory = None  # plain tuples whatever the caller's connection uses
        return cur

    def check_sketched(self, ids: Sequence[str], sketches: Sketches) -> list[Verdict]:
        """The verdicts for one chunk of rows in order, from their sketches (`self.sketcher.sketch`)."""
        if not (self._spec.exact or self._spec.near):
            return [("unique", None)] * len(ids)
        spec, cur = self._spec, self._cursor()
        digests, signatures, keys = sketches.digests, sketches.signatures, sketches.keys
        known_exact = dict(self._select_in(cur, "SELECT e.digest, r.row_id FROM dedup_exact e "
                                                "JOIN dedup_row r ON r.seq = e.seq WHERE e.digest IN", set(digests)))
        if spec.near:
            lookup = [i for i in range(len(ids)) if not spec.exact or digests[i] not in known_exact]
            key_seqs, stored = self._stored_candidates(cur, keys[lookup])
            has_stored = np.isin(keys, np.fromiter(key_seqs, dtype=np.int64, count=len(key_seqs))).any(axis=1)
            earlier = _earlier_rows_sharing_a_key(keys)

        # from the state, not memory: a caller's rollback may have dropped rows registered since
        next_seq = cur.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM dedup_row").fetchone()[0]
        new_exact: dict[bytes, str] = {}  # digest -> row id, unique rows of this chunk
        registered = np.zeros(len(ids), dtype=bool)
        verdicts: list[Verdict] = []
        for i, row_id in enumerate(ids):
            if spec.exact:
                first = known_exact.get(digests[i], new_exact.get(digests[i]))
                if first is not None:
                    verdicts.append(("exact", first))
                    continue
            if spec.near:
                first = None
                if has_stored[i]:
                    seqs = sorted({seq for key in keys[i].tolist() for seq in key_seqs.get(key, ())})
                    first = self._earliest_similar(signatures[i], [stored[seq] for seq in seqs])
                if first is None and i in earlier:  # rows of this chunk come after every stored row
                    chunk_rows = [(ids[j], signatures[j]) for j in earlier[i] if registered[j]]
                    first = self._earliest_similar(signatures[i], chunk_rows)
                if first is not None:
                    verdicts.append(("near", first))
                    continue
            registered[i] = True
            if spec.exact:
                new_exact[digests[i]] = row_id
            verdicts.append(("unique", None))

        unique = np.flatnonzero(registered)
        if len(unique):
            seqs = np.arange(next_seq, next_seq + len(unique), dtype=np.int64)
            pairs = list(zip(seqs.tolist(), unique.tolist()))
            _insert_many(cur, "INTO dedup_row (seq, row_id, sig)", [
                value for seq, i in pairs for value in (seq, ids[i], signatures[i].tobytes() if spec.near else None)], 3)
            if spec.exact:  # sorted, like the band keys: B-tree locality
                _insert_many(cur, "INTO dedup_exact (digest, seq)",
                             [value for pair in sorted((digests[i], seq) for seq, i in pairs) for value in pair], 2)
            if spec.near:
                band_keys, band_seqs = keys[unique].ravel(), np.repeat(seqs, keys.shape[1])
                order = np.lexsort((band_seqs, band_keys))
                flat = np.empty(2 * len(order), dtype=np.int64)
                flat[0::2], flat[1::2] = band_keys[order], band_seqs[order]
                # OR IGNORE: a 2**-64 key collision
                _insert_many(cur, "OR IGNORE INTO dedup_band_recent (key, seq)", flat.tolist(), 2)
                self._filter.add(band_keys)
                self._merge_bands(cur, last_seq=int(seqs[-1]))
            self.last_seq = int(seqs[-1])
        return verdicts

    def _stored_candidates(self, cur: sqlite3.Cursor, keys: np.ndarray) -> tuple[dict[int, list[int]], dict]:
        """Registered rows sharing a band key with these: {key: [seq]} and {seq: (row id, signature)}."""
        flat = keys.ravel()
        wanted = set(flat[self._filter.may_contain(flat)].tolist())
        key_seqs: dict[int, list[int]] = {}
        for table in ("dedup_band", "dedup_band_recent"):
            for key, seq in self._select_in(cur, f"SELECT key, seq FROM {table} WHERE key IN", wanted):
                key_seqs.setdefault(key, []).append(seq)
        candidates = {seq for seqs in key_seqs.values() for seq in seqs}
        rows = self._select_in(cur, "SELECT seq, row_id, sig FROM dedup_row WHERE seq IN", candidates)
        stored = {seq: (row_id, np.frombuffer(sig, dtype=np.uint32)) for seq, row_id, sig in rows}
        return key_seqs, stored

    @staticmethod
    def _merge_bands(cur: sqlite3.Cursor, last_seq: int) -> None:
        """Move the recent band keys into the main index once they cover MERGE_ROWS rows (see MERGE_ROWS)."""
        row = cur.execute("SELECT value FROM dedup_meta WHERE key = 'bands_merged_through'").fetchone()
        if last_seq - (int(row[0]) if row else 0) < MERGE_ROWS:
            return
        cur.execute("INSERT OR IGNORE INTO dedup_band (key, seq) "
                    "SELECT key, seq FROM dedup_band_recent ORDER BY key, seq")
        cur.execute("DELETE FROM dedup_band_recent")
        cur.execute("INSERT OR REPLACE INTO dedup_meta (key, value) VALUES ('bands_merged_through', ?)",
                    (str(last_seq),))

    def _earliest_similar(self, signature: np.ndarray, candidates: list[tuple[str, np.ndarray]]) -> str | None:
        """The row id of the first candidate (they come in registration order) with estimated Jaccard >= threshold."""
        if not candidates:
            return None
        equal = np.count_nonzero(np.stack([sig for _, sig in candidates]) == signature, axis=1)
        similar = np.flatnonzero(equal / self._spec.num_perm >= self._spec.threshold)
        return candidates[similar[0]][0] if len(similar) else None

    @staticmethod
    def _select_in(cur: sqlite3.Cursor, query: str, values: Iterable) -> Iterator[tuple]:
        values = list(values)
        for start in range(0, len(values), _SQL_VARS):
            part = values[start : start + _SQL_VARS]
            yield from cur.execute(f"{query} ({','.join('?' * len(part))})", part)
