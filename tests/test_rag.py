"""Chapter 02 (RAG): what the notebook cannot pin as cheaply: incremental re-index counts on a fresh index,
the embedded-Qdrant lock, a missing index, bad queries and filters, and chunk-id stability.
Real MiniLM embedder, real embedded Qdrant in a temporary folder."""

import hashlib
from collections import Counter

import pytest

rag = pytest.importorskip("llmtwin_nb.rag")
from llmtwin_nb import chunking, evalset
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
    fp = chunking.embedder_fp(emb)
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
    cache = chunking.EmbeddingCache(tmp_path / "emb", chunking.embedder_fp(emb))
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


def _corpus():
    """Eight documents on four platforms: random pseudo-word paragraphs (dense search has neighbours to rank) and one topic line each,
    so BM25 scores do not tie exactly (tied points are ordered by Qdrant's internal storage order, which the fast path cannot see)."""
    import random
    rnd = random.Random(7)
    vocab = [f"{a}{b}" for a in ("zor", "quel", "mib", "trax", "vun", "plo", "gref", "snu", "kab", "wim") for b in ("a", "o", "ix", "um", "et", "ar", "ul", "en")]
    topics = ["pondlet float16 batches conversion cache", "Lasagne the cat walked on the keyboard", "Tidewater vector store bill",
              "reefer containers dwell time Waalhaven", "shadow mode rollout Venlo", "eval set before fine-tuning",
              "retries without backoff carrier", "notebook lab report factory"]
    plats = ["medium", "linkedin", "github", "substack"]
    out = []
    for i in range(8):
        d = _doc(i, plats[i % 4], "post" if plats[i % 4] == "linkedin" else "article", 10)
        body = "\n\n".join(" ".join(rnd.choice(vocab) for _ in range(rnd.randint(25, 45))).capitalize() + "." for _ in range(4))
        d["content"] = body + f"\n\n{topics[i]} is what this part is about, and {' '.join(topics[(i + 1) % 8].split()[:2])} too."
        out.append(d)
    return out


def test_hybrid_fast_path_matches_qdrant(tmp_path, cfg, emb):
    "The embedded fast path (numpy filters + BM25 postings + client-side RRF) returns what Qdrant's own local search returns."
    docs = _corpus()
    chunks = _chunks(docs, cfg, emb)
    with rag.open_qdrant(tmp_path / "q") as client:
        rag.sync_index(client, "t", chunks, emb)
        assert rag.has_sparse(client, "t") and rag.is_embedded(client)
        fast = rag.Retriever(client, "t", emb, None, None, cfg.model_copy(update=dict(local_fastpath=True, candidates=8)))
        native = rag.Retriever(client, "t", emb, None, None, cfg.model_copy(update=dict(local_fastpath=False, candidates=8)))
        assert fast.local is not None and native.local is None and fast.known == native.known
        for q, f in [("Tidewater vector store bill", None), ("What did the cat do on the keyboard?", {"platform": "linkedin"}),
                     ("reefer containers float16", {"platform": ["github", "substack"]}), ("shadow mode", {"kind": "post"})]:
            for hybrid in (True, False):
                for expansion in (True, False):
                    a = fast.retrieve(q, k=6, filters=f, hybrid=hybrid, expansion=expansion, self_query=False)
                    b = native.retrieve(q, k=6, filters=f, hybrid=hybrid, expansion=expansion, self_query=False)
                    assert [h.id for h in a] == [h.id for h in b], (q, f, hybrid, expansion)
                    assert [round(h.score, 5) for h in a] == [round(h.score, 5) for h in b]
                    if f: assert all(h.payload[k] in (v if isinstance(v, list) else [v]) for h in a for k, v in f.items())
        # BM25 finds the document that holds the exact rare words
        hit = fast.retrieve("Waalhaven reefer dwell", k=1, hybrid=True, expansion=False, self_query=False)[0]
        assert "Waalhaven" in hit.text
        # a new document synced through the same client is seen after refresh()
        new = _doc(99, "github", "repository", 60, extra="\n\nQuokkaflux is a made-up word that only this document holds.")
        rag.sync_index(client, "t", chunks + _chunks([new], cfg, emb), emb)
        fast.refresh()
        assert fast.retrieve("quokkaflux", k=1, hybrid=True, expansion=False, self_query=False)[0].doc_id == new["id"]


def test_rrf_and_idf_formulas():
    assert rag.rrf_fuse([["a", "b"], ["b", "c"]], k=2) == [("b", 1 / 3 + 1 / 2), ("a", 1 / 2), ("c", 1 / 3)]
    assert rag.rrf_fuse([["a"], ["b"]], k=2) == [("a", 0.5), ("b", 0.5)]           # ties keep first-seen order
    import math
    assert abs(rag.bm25_idf(1, 10) - math.log(1 + 9.5 / 1.5)) < 1e-12 and rag.bm25_idf(10, 10) < rag.bm25_idf(1, 10)
    assert chunking.lexical_terms("The Vectors and the queries") == ["vector", "query"]
    sv = chunking.sparse_doc_vector("cat cat dog")
    assert sv.indices == sorted(sv.indices) and len(sv.indices) == 2


def test_index_without_sparse_vectors(tmp_path, cfg, emb):
    "An index built before hybrid search: sync refuses it by name, the retriever warns and searches dense vectors only."
    from qdrant_client import models
    chunks = _chunks([_doc(0)], cfg, emb)
    vecs = emb.encode([c.embed_text for c in chunks], normalize_embeddings=True)
    with rag.open_qdrant(tmp_path / "q") as client:
        client.create_collection("old", vectors_config=models.VectorParams(size=vecs.shape[1], distance=models.Distance.COSINE))
        client.upsert("old", points=[models.PointStruct(id=c.id, vector=v.tolist(), payload=c.payload) for c, v in zip(chunks, vecs)])
        with pytest.raises(ValueError, match="without the 'bm25' sparse vectors"):
            rag.sync_index(client, "old", chunks, emb)
        with pytest.warns(UserWarning, match="searching dense vectors only"):
            r = rag.Retriever(client, "old", emb, None, None, cfg)
        info = {}
        assert r.retrieve("float16 conversion", k=2, info=info) and info["hybrid"] is False


def test_keyword_questions_are_unambiguous():
    "A keyword question is extended (or refused) until only documents holding the answer contain all its terms."
    import numpy as np
    C = chunking.Chunk
    chunks = [C("a", "d1", 0, "The Venlo shadow rollout took eleven days before the switch in March 2023.", "", 20, {"author": "Ilse M"}),
              C("b", "d2", 0, "Shadow rollout notes: nothing about Venlo dates here, only the switch and its checklist.", "", 20, {}),
              C("c", "d3", 0, "Announcing the post: the Venlo shadow rollout took eleven days, switch in March 2023.", "", 20, {}),
              C("d", "d4", 0, "A chunk about cats.", "", 5, {})]
    kq = evalset.KeywordQuestions(chunks)
    r = kq.ask(chunks[0], np.random.default_rng(0))
    assert not isinstance(r, str), r
    terms, sentence, relevant = r
    holders = kq.docs_with(terms)
    assert "d2" not in holders or len(terms) > 2                        # d2 shares words but not the answer
    assert set(relevant) == {"d1", "d3"} & holders | {"d1"} and "d2" not in relevant
    assert kq.ask(chunks[3], np.random.default_rng(0)) == "no usable sentence"
    q, ans, rel = kq.question(chunks[0], np.random.default_rng(1))
    assert q.endswith("?") and ans == sentence and rel == relevant


def test_cpu_threads_restored():
    import torch
    before = torch.get_num_threads()
    with rag.cpu_threads(1):
        assert torch.get_num_threads() == 1
        from threadpoolctl import threadpool_info
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert torch.get_num_threads() == before
    with rag.cpu_threads(0): assert torch.get_num_threads() == before


def test_query_embedding_equals_encode(tmp_path, cfg, emb):
    "The retriever's direct forward pass gives what SentenceTransformer.encode gives."
    import numpy as np
    chunks = _chunks([_doc(0)], cfg, emb)
    with rag.open_qdrant(tmp_path / "q") as client:
        rag.sync_index(client, "t", chunks, emb)
        r = rag.Retriever(client, "t", emb, None, None, cfg)
        texts = ["How much did Tidewater pay?", "pondlet float16 conversion cache, and a much longer second question here"]
        assert np.abs(r.embed(texts) - emb.encode(texts, normalize_embeddings=True)).max() < 1e-5


def test_index_holds_only_the_twins_documents(tmp_path, docs, emb):
    "Given a warehouse of two authors, build_index indexes the twin's documents only; switching the twin swaps the index."
    other = [dict(_doc(10 + i, p, "article"), author="Marisol Vega", author_id="marisol-vega") for i, p in enumerate(("medium", "local"))]
    cfg = rag.RagParams(qdrant_path="q", embed_cache="emb", post_tokens=48, article_tokens=48, repository_tokens=48, overlap_tokens=8, candidates=5)
    quiet = lambda *a: None
    rep = rag.build_index(other + docs, cfg, emb, root=tmp_path, log=quiet, author="Ilse Marchetti")
    with rag.open_qdrant(tmp_path / "q", create=False) as client:
        ids = rag.indexed_ids(client, cfg.collection)
        assert set(ids.values()) == {d["id"] for d in docs} and rep.chunks == len(ids)
        pts = client.scroll(cfg.collection, limit=1000, with_payload=["author"])[0]
        assert {p.payload["author"] for p in pts} == {"Ilse Marchetti"}
        r = rag.Retriever(client, cfg.collection, emb, None, None, cfg)
        assert r.known["author"] == ["Ilse Marchetti"] and "local" not in r.known["platform"]
        with pytest.raises(rag.UnknownFilterError, match="unknown author 'Marisol Vega'"):
            r.retrieve("float16 conversion", filters={"author": "Marisol Vega"})
    rep2 = rag.build_index(other + docs, cfg, emb, root=tmp_path, log=quiet, author="Marisol Vega")
    assert rep2.deleted == len(ids) and rep2.docs_touched == len(docs) + len(other)
    with rag.open_qdrant(tmp_path / "q", create=False) as client:
        assert set(rag.indexed_ids(client, cfg.collection).values()) == {d["id"] for d in other}
    with pytest.raises(ValueError, match="set data.author"):
        rag.build_index(docs, cfg, emb, root=tmp_path, log=quiet, author="Nobody Atall")


def test_load_docs_reads_the_warehouse_through_load_documents(tmp_path, docs):
    "rag.load_docs is chapter 01's load_documents as dicts: every author, the twin's only, or its clear error; vanished rows left out."
    from llmtwin_nb import data
    other = dict(_doc(20), author="Marisol Vega", author_id="marisol-vega")
    gone = dict(_doc(21), status="vanished")
    rows = [dict(d, metadata="{}", status=d.get("status", "active"), first_seen="2026-01-01T00:00:00Z", updated_at="2026-01-01T00:00:00Z")
            for d in docs + [other, gone]]
    data.write_warehouse(rows, tmp_path / "wh")
    everyone = rag.load_docs(tmp_path / "wh")
    assert {d["author"] for d in everyone} == {"Ilse Marchetti", "Marisol Vega"} and gone["id"] not in {d["id"] for d in everyone}
    mine = rag.load_docs(tmp_path / "wh", author="Ilse Marchetti")
    assert sorted(d["id"] for d in mine) == sorted(d["id"] for d in docs) and set(mine[0]) == set(rag.DOC_FIELDS)
    assert mine[0]["metadata"] == {} and isinstance(mine[0]["content"], str)
    with pytest.raises(ValueError, match="data.author must match"):
        rag.load_docs(tmp_path / "wh", author="Nobody Atall")
    with pytest.raises(FileNotFoundError, match="dvc repro data"):
        rag.load_docs(tmp_path / "nowhere")


def test_persisted_index_second_run_upserts_only_the_added_document(tmp_path, docs, emb):
    "Two build_index runs on one folder (what `persist: true` gives the rag stage): the second writes only the new document's chunks."
    cfg = rag.RagParams(qdrant_path="q", embed_cache="emb", post_tokens=48, article_tokens=48, repository_tokens=48, overlap_tokens=8, candidates=5)
    quiet = lambda *a: None
    first = rag.build_index(docs, cfg, emb, root=tmp_path, log=quiet)
    assert (first.upserted, first.unchanged) == (first.chunks, 0)
    new = _doc(30, "substack")
    second = rag.build_index(docs + [new], cfg, emb, root=tmp_path, log=quiet)
    n_new = len(_chunks([new], cfg, emb))
    assert (second.upserted, second.unchanged, second.deleted, second.docs_touched) == (n_new, first.chunks, 0, 1)
    assert second.embedded == n_new                                       # only the new document's texts were embedded
    with rag.open_qdrant(tmp_path / "q", create=False) as client:
        by_doc = Counter(rag.indexed_ids(client, cfg.collection).values())
        assert by_doc[new["id"]] == n_new and sum(by_doc.values()) == first.chunks + n_new
    third = rag.build_index(docs, cfg, emb, root=tmp_path, log=quiet)   # the document deleted from the warehouse: its points go
    assert (third.upserted, third.deleted, third.unchanged) == (0, n_new, first.chunks)


def test_source_phrases_are_recognised_and_name_no_author():
    "Every phrase a generated question may start with is one self-query filters on, and none is tied to one corpus."
    for platform, phrase in evalset.SOURCE_PHRASE.items():
        assert rag.rule_filters(f"{phrase}, what is said about the cat and the router?") == {"platform": platform}
    assert rag.rule_filters("What do the benchmarks in the project docs say about p95?") == {"platform": "github"}
    assert rag.rule_filters("What did she write in her notes about label parties?") == {"platform": "local"}
    assert rag.rule_filters("What did Marisol say on LinkedIn?", ["Marisol Vega"]) == {"platform": "linkedin", "author": "Marisol Vega"}
    import inspect
    src = inspect.getsource(rag).lower()
    assert not any(w in src for w in ("pondlet", "ilse", "marchetti", "tidewater", "lasagne"))


def test_persisted_index_of_another_embedder_is_recreated_by_build_index(tmp_path, docs, emb):
    "A persisted folder whose collection has another vector size (the embedder changed): sync refuses it, build_index recreates it."
    from qdrant_client import models
    cfg = rag.RagParams(qdrant_path="q", embed_cache="emb", post_tokens=48, article_tokens=48, repository_tokens=48, overlap_tokens=8, candidates=5)
    with rag.open_qdrant(tmp_path / "q") as client:
        client.create_collection(cfg.collection, vectors_config=models.VectorParams(size=8, distance=models.Distance.DOT),
                                 sparse_vectors_config={chunking.SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)})
        client.upsert(cfg.collection, points=[models.PointStruct(id=1, vector={"": [0.1] * 8}, payload={"doc_id": "x"})])
        with pytest.raises(ValueError, match="holds 8-d vectors"):
            rag.sync_index(client, cfg.collection, _chunks(docs[:1], cfg, emb), emb)
    rep = rag.build_index(docs, cfg, emb, root=tmp_path, log=lambda *a: None)
    assert (rep.upserted, rep.unchanged, rep.deleted) == (rep.chunks, 0, 0)
    with rag.open_qdrant(tmp_path / "q", create=False) as client:
        assert client.get_collection(cfg.collection).config.params.vectors.size == emb.get_embedding_dimension()
        assert "x" not in set(rag.indexed_ids(client, cfg.collection).values())
