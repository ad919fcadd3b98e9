"""Chapter 02 (RAG): what the notebook cannot pin as cheaply: incremental re-index counts on a fresh index,
the embedded-Qdrant lock, a missing index, bad queries and filters, and chunk-id stability.
Real MiniLM embedder, real embedded Qdrant in a temporary folder."""

import hashlib

import pytest

rag = pytest.importorskip("llmtwin_nb.rag")
from llmtwin_nb.core import load_embedder

WORDS = ("pondlet scores four thousand rows per batch because the block conversion from float16 to float32 "
         "stays in cache and that makes the search about fifteen percent faster on a laptop").split()


def _doc(i, platform="medium", kind="article", n=220, extra=""):
    text = "\n\n".join(" ".join(WORDS[(i + j) % len(WORDS):] + WORDS[:(i + j) % len(WORDS)]).capitalize() + f" Doc {i} part {j}."
                       for j in range(n // len(WORDS) + 1)) + extra
    return dict(id=hashlib.sha256(f"doc{i}".encode()).hexdigest()[:16], author="Ilse Marchetti", author_id="ilse-marchetti",
                platform=platform, kind=kind, title=f"Document {i}", url=f"https://example.org/{i}", published_at=None,
                content=text, content_hash=hashlib.sha256(text.encode()).hexdigest(), metadata={}, split="train")


@pytest.fixture(scope="module")
def emb():
    return load_embedder("packaged:minilm", "cpu")


@pytest.fixture()
def cfg():
    return rag.RagParams(post_tokens=48, article_tokens=48, repository_tokens=48, overlap_tokens=8, candidates=5)


@pytest.fixture()
def docs():
    return [_doc(0), _doc(1, "linkedin", "post", 60), _doc(2, "github", "repository"), _doc(3, "substack")]


def _chunks(docs, cfg, emb):
    fp = rag._embedder_fp(emb)
    return [c for d in docs for c in rag.chunk_document(d, cfg, emb.tokenizer, emb, fp)]


class Counting:
    "Wraps a QdrantClient and records every point id it is asked to upsert or delete."
    def __init__(self, client): self.c, self.upserted, self.deleted = client, [], []
    def upsert(self, name, points, **kw): self.upserted += [str(p.id) for p in points]; return self.c.upsert(name, points=points, **kw)
    def delete(self, name, points_selector, **kw): self.deleted += [str(i) for i in points_selector.points]; return self.c.delete(name, points_selector=points_selector, **kw)
    def __getattr__(self, k): return getattr(self.c, k)


def test_chunk_ids_stable(docs, cfg, emb):
    a, b = _chunks(docs, cfg, emb), _chunks(docs, cfg, emb)
    assert [c.id for c in a] == [c.id for c in b] and len({c.id for c in a}) == len(a)
    assert len({c.doc_id for c in a}) == 4 and all(c.n_tokens <= emb.max_seq_length for c in a)
    edited = [dict(docs[0], content=docs[0]["content"] + "\n\nA closing paragraph that was not there before.")] + docs[1:]
    c = _chunks(edited, cfg, emb)
    old, new = {x.id for x in a}, {x.id for x in c}
    changed = {x.doc_id for x in a if x.id not in new} | {x.doc_id for x in c if x.id not in old}
    assert changed == {docs[0]["id"]}                                   # only the edited document's ids move
    assert old & new                                                    # and its untouched chunks keep theirs


def test_incremental_reindex_counts(tmp_path, docs, cfg, emb):
    chunks = _chunks(docs, cfg, emb)
    cache = rag.EmbeddingCache(tmp_path / "emb", rag._embedder_fp(emb))
    with rag.open_qdrant(tmp_path / "q") as client:
        cc = Counting(client)
        r = rag.sync_index(cc, "t", chunks, emb, cache)
        assert (r.upserted, r.deleted, r.embedded, r.docs_touched) == (len(chunks), 0, len(chunks), 4)
        assert client.count("t").count == len(chunks)
        cc.upserted.clear()
        r = rag.sync_index(cc, "t", chunks, emb, cache)                 # nothing changed
        assert (r.upserted, r.deleted, r.embedded) == (0, 0, 0) and cc.upserted == [] and cc.deleted == []
        # edit one document in the middle: its chunks from the edit on change, nothing else is touched
        d0 = docs[0]; paras = d0["content"].split("\n\n"); paras[1] = "Lasagne walked across the keyboard and typed k equals ninety nine million."
        edited = [dict(d0, content="\n\n".join(paras))] + docs[1:]
        new_chunks = _chunks(edited, cfg, emb)
        old_ids, new_ids = {c.id for c in chunks}, {c.id for c in new_chunks}
        r = rag.sync_index(cc, "t", new_chunks, emb, cache)
        assert set(cc.upserted) == new_ids - old_ids and set(cc.deleted) == old_ids - new_ids
        assert r.upserted == len(new_ids - old_ids) > 0 and r.deleted == len(old_ids - new_ids) > 0 and r.docs_touched == 1
        assert {c.doc_id for c in new_chunks if c.id in set(cc.upserted)} == {d0["id"]}
        n_d0 = sum(c.doc_id == d0["id"] for c in new_chunks)
        assert 0 < r.embedded <= n_d0                                    # only never-seen texts are embedded
        # a vanished document: exactly its chunks are deleted
        cc.upserted.clear(); cc.deleted.clear()
        r = rag.sync_index(cc, "t", [c for c in new_chunks if c.doc_id != docs[3]["id"]], emb, cache)
        assert cc.upserted == [] and set(cc.deleted) == {c.id for c in new_chunks if c.doc_id == docs[3]["id"]}
        assert client.count("t").count == len(new_chunks) - r.deleted
        # the edit reverted: everything comes from the embedding cache
        r = rag.sync_index(cc, "t", chunks, emb, cache)
        assert r.embedded == 0 and r.upserted == len(old_ids - new_ids) + sum(c.doc_id == docs[3]["id"] for c in chunks)
    cache.close()


def test_locked_and_missing_index(tmp_path, docs, cfg, emb):
    with pytest.raises(rag.IndexNotFoundError, match="dvc repro rag"):
        with rag.open_qdrant(tmp_path / "nothing", create=False): pass
    with rag.open_qdrant(tmp_path / "q") as c1:
        with pytest.raises(rag.IndexLockedError, match="open in another client"):
            with rag.open_qdrant(tmp_path / "q"): pass
        with pytest.raises(rag.IndexNotFoundError, match="does not exist"):
            rag.Retriever(c1, "missing", emb, None, None, cfg)
    with rag.open_qdrant(tmp_path / "q") as c2:                         # closed on exit: the folder is free again
        assert not c2.collection_exists("missing")


def test_bad_queries_and_filters(tmp_path, docs, cfg, emb):
    chunks = _chunks(docs, cfg, emb)
    with rag.open_qdrant(tmp_path / "q") as client:
        rag.sync_index(client, "t", chunks, emb)
        r = rag.Retriever(client, "t", emb, None, None, cfg)
        assert r.known["platform"] == ["github", "linkedin", "medium", "substack"]
        for bad in ("", "   ", None):
            with pytest.raises(rag.QueryError, match="empty query"): r.retrieve(bad)
        with pytest.raises(rag.QueryError, match="embedder reads at most"): r.retrieve("float16 conversion " * 300)
        with pytest.raises(rag.UnknownFilterError, match="unknown platform 'myspace'"): r.retrieve("pondlet", filters={"platform": "myspace"})
        with pytest.raises(rag.UnknownFilterError, match="unknown author"): r.retrieve("pondlet", filters={"author": "Nobody"})
        with pytest.raises(rag.UnknownFilterError, match="cannot filter on"): r.retrieve("pondlet", filters={"colour": "red"})
        hits = r.retrieve("What did she post on LinkedIn about batches?", info=(info := {}))
        assert info["filters"] == {"platform": "linkedin"} and hits and {h.payload["platform"] for h in hits} == {"linkedin"}
        hits = r.retrieve("float16 to float32 conversion", k=3, filters={"platform": ["github", "medium"]}, self_query=False)
        assert len(hits) == 3 and {h.payload["platform"] for h in hits} <= {"github", "medium"}
        ctx, sources = rag.assemble_context(hits, emb.tokenizer, 80)
        assert ctx.startswith("[1] ") and len(emb.tokenizer(ctx, add_special_tokens=False)["input_ids"]) <= 80
        assert [s["n"] for s in sources] == list(range(1, len(sources) + 1))
