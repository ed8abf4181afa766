"""Dedup: exact and near duplicates across a prepare run, first occurrence wins, state in SQLite."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from forge.contract.plan import DedupSpec
from forge.errors import DataError
from forge.runner.prepare import dedup as dedup_module
from forge.runner.prepare.dedup import Deduplicator, _Sketcher, band_params, normalise_for_dedup


def words(seed: int, n: int = 100) -> list[str]:
    rng = random.Random(seed)
    return [f"w{rng.randrange(10**6)}" for _ in range(n)]


def text(seed: int, n: int = 100) -> str:
    return " ".join(words(seed, n))


def changed(seed: int, positions, n: int = 100) -> str:
    """Text `seed` with the words at `positions` replaced by words no text contains."""
    ws = words(seed, n)
    for p in positions:
        ws[p] = f"changed{p}"
    return " ".join(ws)


def jaccard(a: str, b: str, n: int = 5) -> float:
    """The true Jaccard similarity of two texts' word n-gram sets (what near dedup estimates)."""
    def shingles(t):
        ws = normalise_for_dedup(t).split()
        return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def fresh(spec: DedupSpec | None = None, db: sqlite3.Connection | None = None) -> Deduplicator:
    return Deduplicator(db or sqlite3.connect(":memory:"), spec or DedupSpec())


def test_normalise_casefolds_and_collapses_whitespace():
    assert normalise_for_dedup("  Hello\t\tWORLD \n straße ") == "hello world strasse"
    assert normalise_for_dedup(" \n\t ") == ""


def test_exact_duplicates_ignore_case_and_spacing():
    d = fresh()
    base = text(1)
    assert d.check("a", base) == ("unique", None)
    assert d.check("b", "  " + base.upper().replace(" ", " \n\t ") + "\n") == ("exact", "a")
    assert d.check("c", base + " more") == ("near", "a")  # one word more: no longer exact
    assert d.check("d", text(2)) == ("unique", None)


@pytest.mark.parametrize("positions", [[50], [3, 4], [40, 41, 42], [0, 97, 98, 99]],
                         ids=["1 word", "2 adjacent words", "3 adjacent words", "4 words at the ends"])
def test_near_duplicate_with_a_few_words_changed_is_caught(positions):
    """Jaccard 0.86-0.92. (Two scattered changes give 0.81, on the threshold: the estimate decides either way.)"""
    near = changed(1, positions)
    assert jaccard(text(1), near) >= 0.8  # the ground truth the estimate must find
    d = fresh()
    assert d.check("a", text(1)) == ("unique", None)
    assert d.check("b", near) == ("near", "a")


def test_three_scattered_changes_fall_below_0_8_with_5_word_shingles():
    """Each changed word alters up to 5 shingles: 3 scattered changes in 100 words leave Jaccard ~0.73."""
    near = changed(1, [15, 50, 85])
    assert jaccard(text(1), near) < 0.75
    d = fresh()
    d.check("a", text(1))
    assert d.check("b", near) == ("unique", None)
    assert fresh(DedupSpec(threshold=0.6)).check_batch([("a", text(1)), ("b", near)])[1] == ("near", "a")


def test_unrelated_and_half_changed_texts_are_unique():
    d = fresh()
    assert d.check("a", text(1)) == ("unique", None)
    assert d.check("b", text(2)) == ("unique", None)
    assert d.check("c", changed(1, range(0, 100, 2))) == ("unique", None)


def test_first_occurrence_wins_and_duplicate_of_points_at_it():
    d = fresh()
    verdicts = d.check_batch([("a", text(1)), ("b", text(1).upper()), ("c", changed(1, [50])), ("d", changed(1, [50]))])
    # b, c and d are not registered, so d (an exact copy of c) still points at a, as a near duplicate
    assert verdicts == [("unique", None), ("exact", "a"), ("near", "a"), ("near", "a")]


def test_the_earliest_of_several_similar_rows_wins_not_the_most_similar():
    """a and x are both unique (Jaccard ~0.41); y is near both, closer to x (~0.68) than to a (~0.6)."""
    base = words(7, 300)
    x = " ".join(f"new{i}" if 20 <= i < 143 else w for i, w in enumerate(base))
    y = " ".join(f"new{i}" if 20 <= i < 90 else w for i, w in enumerate(base))
    a = " ".join(base)
    assert jaccard(a, x) < 0.45 and 0.55 < jaccard(a, y) < jaccard(x, y)
    spec = DedupSpec(threshold=0.5, num_perm=256)
    assert fresh(spec).check_batch([("a", a), ("x", x), ("y", y)]) == [("unique", None), ("unique", None), ("near", "a")]
    assert fresh(spec).check_batch([("x", x), ("a", a), ("y", y)]) == [("unique", None), ("unique", None), ("near", "x")]


def mixed_rows(count: int = 300) -> list[tuple[str, str]]:
    """Originals with exact and near copies of earlier rows, some within `CHUNK_ROWS` of each other."""
    rng = random.Random(5)
    rows = []
    for i in range(count):
        roll = rng.random()
        if i < 5 or roll < 0.7:
            rows.append((f"r{i}", text(1000 + i, rng.randint(3, 150))))
        else:
            _, source = rows[rng.randrange(len(rows))]
            ws = source.split()
            if roll < 0.85:
                rows.append((f"r{i}", "  ".join(ws).title()))
            else:
                ws[rng.randrange(len(ws))] = f"new{i}"
                rows.append((f"r{i}", " ".join(ws)))
    return rows


def dump(db: sqlite3.Connection) -> list:
    """The registered rows, exact digests and band keys (wherever the merge has put them)."""
    return [db.execute(query).fetchall() for query in (
        "SELECT * FROM dedup_row ORDER BY seq",
        "SELECT * FROM dedup_exact ORDER BY digest",
        "SELECT * FROM dedup_band UNION ALL SELECT * FROM dedup_band_recent ORDER BY 1, 2",
    )]


def test_check_and_check_batch_agree_and_two_fresh_dbs_give_identical_results(monkeypatch):
    rows = mixed_rows()
    one_by_one_db, batch_db, small_chunks_db = (sqlite3.connect(":memory:") for _ in range(3))
    one_by_one = [fresh(db=one_by_one_db).check(rid, t) for rid, t in rows[:1]]
    d = fresh(db=one_by_one_db)
    one_by_one += [d.check(rid, t) for rid, t in rows[1:]]
    batched = fresh(db=batch_db).check_batch(rows)
    monkeypatch.setattr(dedup_module, "CHUNK_ROWS", 7)  # duplicates across chunk boundaries too
    monkeypatch.setattr(dedup_module, "MERGE_ROWS", 10)  # and band keys merged into the main index often
    small_chunks = fresh(db=small_chunks_db).check_batch(rows)

    kinds = {verdict for verdict, _ in batched}
    assert kinds == {"unique", "exact", "near"}
    assert one_by_one == batched == small_chunks
    assert dump(one_by_one_db) == dump(batch_db) == dump(small_chunks_db)
    assert small_chunks_db.execute("SELECT COUNT(*) FROM dedup_band").fetchone()[0] > 0
    assert batch_db.execute("SELECT COUNT(*) FROM dedup_band").fetchone()[0] == 0  # under MERGE_ROWS: all recent


def test_chunks_are_bounded_by_characters_too(monkeypatch):
    rows = mixed_rows(120)
    expected = fresh().check_batch(rows)
    monkeypatch.setattr(dedup_module, "CHUNK_CHARS", 2000)  # a few rows per chunk, one when a row is longer
    assert fresh().check_batch(rows) == expected


def test_signatures_are_the_same_in_other_processes():
    """No salted `hash()` anywhere: another interpreter with another PYTHONHASHSEED computes the same bytes."""
    texts = [normalise_for_dedup(t) for t in ("Hello there world", text(3), text(4, 400), "", "y" * 5000 + " tail")]
    program = textwrap.dedent(f"""
        import json
        from forge.runner.prepare.dedup import _Sketcher
        sketcher = _Sketcher(128, 5, 9, 13)
        signatures = sketcher.signatures({texts!r})
        print(json.dumps([signatures.tobytes().hex(), sketcher.band_keys(signatures).tolist()]))
    """)
    ours = _Sketcher(128, 5, 9, 13)
    expected = [ours.signatures(texts).tobytes().hex(), ours.band_keys(ours.signatures(texts)).tolist()]
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", program], env={"PYTHONHASHSEED": seed, "PATH": ""},
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == expected


def test_rollback_forgets_the_rows_and_commit_keeps_them_across_connections(tmp_path):
    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path, isolation_level="DEFERRED")  # as the pipeline opens it
    d = Deduplicator(db, DedupSpec())
    assert d.check("a", text(1)) == ("unique", None)
    assert d.check("b", text(1)) == ("exact", "a")
    db.rollback()
    assert d.check("a2", text(1)) == ("unique", None)
    assert d.check("x", text(2)) == ("unique", None)
    db.commit()
    db.close()

    db = sqlite3.connect(path, isolation_level="DEFERRED")
    d = Deduplicator(db, DedupSpec())
    assert d.check_batch([("b", text(1).upper()), ("c", changed(1, [10])), ("y", changed(2, [90]))]) == [
        ("exact", "a2"), ("near", "a2"), ("near", "x")]
    db.close()


def test_a_killed_shard_is_forgotten_and_the_rerun_gives_the_same_verdicts(tmp_path):
    """kill -9 in the middle of a shard: its inserts roll back; rerunning that shard matches an unbroken run."""
    rows = mixed_rows(200)
    shard_1, shard_2 = rows[:100], rows[100:]
    (tmp_path / "shards.json").write_text(json.dumps([shard_1, shard_2]))
    program = textwrap.dedent("""
        import json, os, signal, sqlite3, sys
        from forge.contract.plan import DedupSpec
        from forge.runner.prepare.dedup import Deduplicator
        shard_1, shard_2 = ([tuple(item) for item in shard] for shard in json.load(open(sys.argv[2])))
        db = sqlite3.connect(sys.argv[1], isolation_level="DEFERRED")
        d = Deduplicator(db, DedupSpec())
        d.check_batch(shard_1)
        db.commit()
        d.check_batch(shard_2)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    path = tmp_path / "state.sqlite"
    killed = subprocess.run([sys.executable, "-c", program, str(path), str(tmp_path / "shards.json")], capture_output=True)
    assert killed.returncode == -9, killed.stderr

    db = sqlite3.connect(path, isolation_level="DEFERRED")
    assert db.execute("SELECT COUNT(*) FROM dedup_row").fetchone()[0] == sum(
        v == "unique" for v, _ in fresh().check_batch(shard_1))
    rerun = Deduplicator(db, DedupSpec()).check_batch(shard_2)
    assert rerun == fresh().check_batch(rows)[100:]


def test_forget_after_unregisters_later_rows_as_if_never_checked(tmp_path, monkeypatch):
    """The pipeline commits rows checked ahead of the shard it writes; a resumed run cuts the state back to
    the last written shard's `last_seq` and must then give exactly an unbroken run's verdicts."""
    monkeypatch.setattr(dedup_module, "MERGE_ROWS", 10)  # some forgotten rows' band keys were merged too
    rows = mixed_rows(200)
    db = sqlite3.connect(tmp_path / "state.sqlite", isolation_level="DEFERRED")
    d = Deduplicator(db, DedupSpec())
    d.check_batch(rows[:100])
    written = d.last_seq
    d.check_batch(rows[100:160])  # the next shard, half done when the process died
    db.commit()
    db.close()

    db = sqlite3.connect(tmp_path / "state.sqlite", isolation_level="DEFERRED")
    resumed = Deduplicator(db, DedupSpec())
    assert resumed.last_seq > written
    resumed.forget_after(written)
    assert resumed.last_seq == written
    assert resumed.check_batch(rows[100:]) == fresh().check_batch(rows)[100:]


def test_the_key_filter_only_skips_lookups(monkeypatch):
    """A clear bit in the band-key filter skips a lookup; it must never hide a stored row. A 16-bit filter
    lets nearly every lookup through, so both must find the same near duplicates across chunks."""
    rows = mixed_rows()
    monkeypatch.setattr(dedup_module, "CHUNK_ROWS", 7)
    expected = fresh().check_batch(rows)
    assert {verdict for verdict, _ in expected} == {"unique", "exact", "near"}
    monkeypatch.setattr(dedup_module, "FILTER_BITS", 4)
    assert fresh().check_batch(rows) == expected


def test_an_empty_batch_and_the_callers_row_factory():
    db = sqlite3.connect(":memory:")
    db.row_factory = lambda cursor, row: {"row": row}  # the caller's choice must not leak into dedup's queries
    d = Deduplicator(db, DedupSpec())
    assert d.check_batch([]) == []
    assert d.check_batch([("a", text(1))]) == [("unique", None)]
    assert d.check_batch([("b", text(1)), ("c", changed(1, [9]))]) == [("exact", "a"), ("near", "a")]


def test_reusing_a_state_with_other_settings_is_refused():
    db = sqlite3.connect(":memory:")
    Deduplicator(db, DedupSpec()).check("a", text(1))
    Deduplicator(db, DedupSpec())  # same settings: fine
    for other in (DedupSpec(threshold=0.7), DedupSpec(num_perm=64), DedupSpec(near=False), DedupSpec(shingle_words=3)):
        with pytest.raises(DataError, match="built with other settings") as error:  # a user's error, with its fix
            Deduplicator(db, other)
        assert "forge prepare --rebuild" in error.value.hint


def test_a_refused_state_names_its_file(tmp_path):
    db = sqlite3.connect(tmp_path / "state.sqlite")
    Deduplicator(db, DedupSpec()).check("a", text(1))
    with pytest.raises(DataError, match=f"The dedup state in {tmp_path / 'state.sqlite'} was built"):
        Deduplicator(db, DedupSpec(threshold=0.7))


def test_the_threshold_is_honoured():
    one_change, four_changes = changed(1, [50]), changed(1, [10, 35, 60, 85])
    assert 0.85 < jaccard(text(1), one_change) < 0.92 and 0.6 < jaccard(text(1), four_changes) < 0.7
    verdicts = {}
    for threshold in (0.5, 0.8, 0.95):
        d = fresh(DedupSpec(threshold=threshold))
        verdicts[threshold] = d.check_batch([("a", text(1)), ("one", one_change), ("four", four_changes)])[1:]
    assert verdicts[0.5] == [("near", "a"), ("near", "a")]
    assert verdicts[0.8] == [("near", "a"), ("unique", None)]
    assert verdicts[0.95] == [("unique", None), ("unique", None)]


def test_exact_only_near_only_and_neither():
    rows = [("a", text(1)), ("b", text(1).upper()), ("c", changed(1, [50]))]
    assert fresh(DedupSpec(near=False)).check_batch(rows) == [("unique", None), ("exact", "a"), ("unique", None)]
    assert fresh(DedupSpec(exact=False)).check_batch(rows) == [("unique", None), ("near", "a"), ("near", "a")]
    db = sqlite3.connect(":memory:")
    assert fresh(DedupSpec(exact=False, near=False), db).check_batch(rows) == [("unique", None)] * 3
    assert db.execute("SELECT COUNT(*) FROM dedup_row").fetchone()[0] == 0


def test_short_and_empty_texts_are_one_shingle():
    rows = [("a", "Hello world"), ("b", "hello   WORLD"), ("c", "hello there"), ("d", ""), ("e", " \n ")]
    assert fresh().check_batch(rows) == [("unique", None), ("exact", "a"), ("unique", None), ("unique", None), ("exact", "d")]
    assert fresh(DedupSpec(exact=False)).check_batch(rows) == [
        ("unique", None), ("near", "a"), ("unique", None), ("unique", None), ("near", "d")]


def test_unicode_text_is_hashed_without_errors():
    rows = [("a", "Straße café 😀 naïve \ud800 tail"), ("b", "STRASSE CAFÉ 😀 NAÏVE \ud800 TAIL"), ("c", "ǅ ǆ Ǆ")]
    assert fresh().check_batch(rows) == [("unique", None), ("exact", "a"), ("unique", None)]


def test_long_texts_and_long_words_sketch_the_same_alone_and_together():
    """Texts past _WORD_SPAN bytes are hashed in several spans, words past _LONG_WORD bytes with BLAKE2b."""
    long_word = "x" * (dedup_module._LONG_WORD + 1)
    texts = [normalise_for_dedup(t) for t in (
        text(1, 40_000), f"{text(2, 30)} {long_word} {text(3, 30)}", long_word, text(4, 50_000), "short one")]
    assert len(texts[0]) + len(texts[3]) > dedup_module._WORD_SPAN
    sketcher = _Sketcher(128, 5, 14, 9)
    together = sketcher.signatures(texts)
    alone = np.vstack([sketcher.signatures([t]) for t in texts])
    assert np.array_equal(together, alone)
    rows = [("a", long_word), ("b", long_word[:-1] + "y"), ("c", long_word.upper())]
    assert fresh(DedupSpec(exact=False)).check_batch(rows) == [("unique", None), ("unique", None), ("near", "a")]


def test_long_texts_sketch_the_same_in_small_blocks(monkeypatch):
    texts = [normalise_for_dedup(text(i, n)) for i, n in enumerate((3, 100, 2000, 1, 0, 40))]
    sketcher = _Sketcher(128, 5, 9, 13)
    whole = sketcher.signatures(texts)
    monkeypatch.setattr(dedup_module, "SHINGLES_PER_BLOCK", 50)  # the long text is folded in block by block
    assert np.array_equal(sketcher.signatures(texts), whole)
    singles = np.vstack([sketcher.signatures([t]) for t in texts])
    assert np.array_equal(singles, whole)


def test_band_parameters_match_datasketch():
    lsh = pytest.importorskip("datasketch.lsh")
    weights = (dedup_module.FALSE_POSITIVE_WEIGHT, dedup_module.FALSE_NEGATIVE_WEIGHT)
    for num_perm in (16, 128, 256):
        for threshold in (0.05, 0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0):
            assert band_params(threshold, num_perm) == lsh._optimal_param(threshold, num_perm, *weights)
            assert band_params(threshold, num_perm, 0.5, 0.5) == lsh._optimal_param(threshold, num_perm, 0.5, 0.5)
    assert band_params(0.8, 128) == (14, 9)
    assert band_params(0.8, 128, 0.5, 0.5) == (9, 13)  # MinHashLSH's default weighting


def test_signatures_match_datasketch_minhash():
    """The vectorised MinHash is datasketch's affine32 MinHash(seed=1) fed with the same shingle hashes."""
    datasketch = pytest.importorskip("datasketch")
    texts = [normalise_for_dedup(t) for t in (text(1), "two words", text(2, 700))]
    sketcher = _Sketcher(128, 5, 9, 13)
    hashes, counts = sketcher.shingle_hashes(texts)
    assert counts.tolist() == [96, 1, 696]
    signatures = sketcher.signatures(texts)
    start = 0
    for signature, count in zip(signatures, counts):
        reference = datasketch.MinHash(128, seed=1, hashfunc=lambda h: h)
        reference.update_batch(hashes[start : start + count].tolist())
        assert np.array_equal(reference.hashvalues, signature)
        start += count
