"""Chapter 1 (data): importers round-trip their formats, archives are extracted safely, the warehouse's
change-data-capture is exact, failing sources are reported without losing the others, PII is masked, and the
git importer never follows links or imports binaries, vendored, generated or oversize files. Sources belong to
authors (records that name their author keep it), Markdown front matter is read, and bad input stops the stage
with a message naming the file before anything is written."""
import csv, json, os, subprocess, time, zipfile
from pathlib import Path

import pytest

from llmtwin_nb.core import ParamsError, get_paths, section_params
from llmtwin_nb.data import (DataError, DataParams, collect_sources, import_book_export, import_git, import_linkedin_export,
                             import_local_folder, import_medium_export, import_substack_export, ImportContext, load_documents,
                             load_warehouse, read_rows, run_etl, warehouse_file)
from llmtwin_nb.readers import SourceError, UnsafeArchiveError, safe_extract_zip, split_front_matter

SAMPLES = get_paths().root/"samples"
FAST = dict(crawl_max_retries=1, crawl_backoff_s=0.01, crawl_per_host_delay_s=0.0, crawl_timeout_s=3)

def make_cfg(sources, author="Ada Tester", **kw) -> DataParams:
    "Validated data params (no demo defaults: author and sources are required)."
    return DataParams(**{**FAST, "author": author, "sources": sources, **kw})

CFG = make_cfg(["medium-export"])

# ---------- small exports in the platforms' formats ----------
MEDIUM_POST = """<!DOCTYPE html><html><head><title>{title}</title></head><body><article class="h-entry">
<header><h1 class="p-name">{title}</h1></header>
<section data-field="subtitle" class="p-summary">{subtitle}</section>
<section data-field="body" class="e-content"><section class="section"><div class="section-content"><div class="section-inner">
<h3 class="graf graf--h3 graf--title">{title}</h3>{body}</div></div></section></section>
<footer><p>By <a href="https://medium.com/@tester" class="p-author h-card">{author}</a> on <a href="https://medium.com/p/{pid}">
<time class="dt-published" datetime="{date}">a date</time></a>.</p><p><a href="{url}" class="p-canonical">Canonical link</a></p>
<p>Exported from <a href="https://medium.com">Medium</a> on November 2, 2026.</p></footer></article></body></html>"""

def body(k: int) -> str:
    return ("<p>Here's the thing: measure the p95.</p><ul><li>one rule;</li><li>two rules.</li></ul><pre>x = 1\nprint(x)</pre>"
            "<p>" + " ".join(f"word{k}x{i}" for i in range(40)) + "</p>")
def body_text(k: int) -> str:
    return "Here's the thing: measure the p95.\n\n- one rule;\n- two rules.\n\n```\nx = 1\nprint(x)\n```\n\n" + " ".join(f"word{k}x{i}" for i in range(40))

def write_medium(folder: Path, posts: list[dict]):
    (folder/"posts").mkdir(parents=True, exist_ok=True)
    (folder/"README.html").write_text("<html><body><h1>Your Medium data</h1></body></html>")
    for p in posts:
        (folder/"posts"/f"{p['date'][:10]}_{p['pid']}.html").write_text(MEDIUM_POST.format(**p))

def write_substack(folder: Path, posts: list[dict]):
    (folder/"posts").mkdir(parents=True, exist_ok=True)
    with open(folder/"posts.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["post_id", "post_date", "is_published", "email_sent_at", "inbox_sent_at", "type", "audience", "title", "subtitle", "podcast_url"])
        w.writeheader()
        for p in posts:
            w.writerow(dict(post_id=p["post_id"], post_date=p["date"], is_published="true", email_sent_at=p["date"], inbox_sent_at=p["date"],
                            type="newsletter", audience="everyone", title=p["title"], subtitle=p["subtitle"], podcast_url=""))
            (folder/"posts"/f"{p['post_id']}.html").write_text(
                p["body"] + '<div class="subscription-widget-wrap" data-attrs="{&quot;url&quot;:&quot;https://tester.substack.com/subscribe?&quot;}">'
                '<p>Thanks for reading! Subscribe for free to receive new posts.</p></div>')

def write_linkedin(folder: Path, posts: list[dict], first="Ada", last="Tester"):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder/"Profile.csv", "w", newline="") as f:
        w = csv.writer(f); w.writerow(["First Name", "Last Name", "Headline"]); w.writerow([first, last, "Engineer"])
    with open(folder/"Shares.csv", "w", newline="") as f:
        w = csv.writer(f); w.writerow(["Date", "ShareLink", "ShareCommentary", "SharedUrl", "MediaUrl", "Visibility"])
        for p in posts: w.writerow([p["date"], p["url"], p["text"], "", "", "MEMBER_NETWORK"])

def medium_posts():
    return [dict(title=f"Post {i}", subtitle=f"Sub {i}", body=body(i), author="Ada Tester", pid=f"abc{i}",
                 date=f"2024-0{i + 1}-02T10:00:00.000Z", url=f"https://medium.com/@tester/post-{i}-abc{i}") for i in range(3)]

def substack_posts():
    return [dict(post_id=f"{100 + i}.issue-{i}", date=f"2024-0{i + 1}-05T07:00:00.000Z", title=f"Issue {i}", subtitle=f"S{i}",
                 body=body(10 + i)) for i in range(2)]

def linkedin_posts():
    text = "First line of a post\n\nA second paragraph with enough words "
    return [dict(date=f"2024-03-0{i + 1} 08:00:00", url=f"https://www.linkedin.com/feed/update/urn:li:share:{i}",
                 text=text + " ".join(f"li{i}w{j}" for j in range(30))) for i in range(3)]

def test_medium_roundtrip(tmp_path):
    posts = medium_posts(); write_medium(tmp_path/"m", posts)
    got = sorted(import_medium_export(tmp_path/"m"), key=lambda r: r.title)
    assert [(r.title, r.url, r.published_at, r.author, r.metadata["subtitle"]) for r in got] == \
           [(p["title"], p["url"], p["date"][:19] + "Z", p["author"], p["subtitle"]) for p in posts]
    from llmtwin_nb.data import clean_body
    assert clean_body(got[0]) == body_text(0)   # title heading dropped, footer gone, structure kept

def test_substack_roundtrip(tmp_path):
    posts = substack_posts(); write_substack(tmp_path/"s", posts)
    got = import_substack_export(tmp_path/"s")
    assert [(r.title, r.url, r.published_at, r.metadata["subtitle"]) for r in got] == \
           [(p["title"], f"https://tester.substack.com/p/{p['post_id'].split('.', 1)[1]}", p["date"][:19] + "Z", p["subtitle"]) for p in posts]
    from llmtwin_nb.data import clean_body
    assert clean_body(got[1]) == body_text(11)   # subscribe widget removed

def test_linkedin_roundtrip(tmp_path):
    posts = linkedin_posts(); write_linkedin(tmp_path/"l", posts)
    got = import_linkedin_export(tmp_path/"l")
    assert [(r.body, r.url, r.published_at, r.author, r.kind) for r in got] == \
           [(p["text"], p["url"], p["date"].replace(" ", "T") + "Z", "Ada Tester", "post") for p in posts]

def test_book_export_and_local_folder_roundtrip(tmp_path):
    recs = [dict(_id={"$oid": "65a1"}, content=dict(Title="A title", Subtitle="sub", Content="Body text of the article."), platform="medium",
                 author_id="u1", author_full_name="Ada Tester", link="https://medium.com/@t/a"),
            dict(_id="65a2", content=dict(Title=None, Content="A LinkedIn post."), platform="linkedin", author_id="u1",
                 author_full_name="Ada Tester", link="https://www.linkedin.com/posts/x", image=None),
            dict(_id="65a3", name="repo", content={"README.md": "# Repo\n\nHello.", "src/a.py": "print(1)\n"}, platform="github",
                 author_id="u1", author_full_name="Ada Tester", link="https://github.com/t/repo")]
    (tmp_path/"export.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    got = import_book_export(tmp_path/"export.jsonl")
    assert [(r.platform, r.kind, r.title, r.body, r.url) for r in got] == [
        ("medium", "article", "A title", "Body text of the article.", "https://medium.com/@t/a"),
        ("linkedin", "post", "https://www.linkedin.com/posts/x", "A LinkedIn post.", "https://www.linkedin.com/posts/x"),
        ("github", "repository", "repo/README.md", "# Repo\n\nHello.", None), ("github", "repository", "repo/src/a.py", "print(1)\n", None)]
    (tmp_path/"notes"/"sub").mkdir(parents=True)
    (tmp_path/"notes"/"a.md").write_text("# Alpha\n\nText."); (tmp_path/"notes"/"sub"/"b.txt").write_text("Beta text.")
    (tmp_path/"notes"/"c.html").write_text("<html><head><title>Gamma</title></head><body><p>G.</p></body></html>")
    os.symlink("/etc/hostname", tmp_path/"notes"/"link.md")
    got = import_local_folder(tmp_path/"notes")
    assert [(r.title, r.fmt, r.metadata["path"]) for r in got] == [("Alpha", "markdown", "a.md"), ("Gamma", "html", "c.html"), ("b", "text", "sub/b.txt")]

# ---------- archives ----------
def zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file(): z.write(p, p.relative_to(folder.parent).as_posix())
    return out

def test_zip_export_imports_like_the_folder(tmp_path):
    write_medium(tmp_path/"medium-export", medium_posts())
    zip_folder(tmp_path/"medium-export", tmp_path/"medium.zip")
    a, fa, _ = collect_sources(["medium-export"], tmp_path, CFG)
    b, fb, _ = collect_sources(["medium.zip"], tmp_path, CFG)
    assert not fa and not fb and [(r.title, r.body, r.url) for r in a] == [(r.title, r.body, r.url) for r in b]

def test_traversal_archive_refused(tmp_path):
    with zipfile.ZipFile(tmp_path/"evil.zip", "w") as z:
        z.writestr("posts.csv", "post_id,title\n"); z.writestr("posts/../../../escaped.txt", "pwned")
    with pytest.raises(UnsafeArchiveError, match="path traversal"): safe_extract_zip(tmp_path/"evil.zip", tmp_path/"out")
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path/"out"/"posts.csv").exists()
    with zipfile.ZipFile(tmp_path/"abs.zip", "w") as z: z.writestr("/tmp/abs.txt", "x")
    with pytest.raises(UnsafeArchiveError, match="absolute path"): safe_extract_zip(tmp_path/"abs.zip", tmp_path/"out2")
    # through the ETL: reported as a failed source with its reason, and the other source still lands
    write_linkedin(tmp_path/"li", linkedin_posts())
    docs, failures, _ = collect_sources(["evil.zip", "li"], tmp_path, CFG)
    assert len(docs) == 3 and failures[0]["source"] == "evil.zip" and "path traversal" in failures[0]["reason"]

def test_symlink_archive_member_refused(tmp_path):
    with zipfile.ZipFile(tmp_path/"link.zip", "w") as z:
        z.writestr("export/ok.txt", "fine")
        zi = zipfile.ZipInfo("export/posts"); zi.external_attr = 0o120777 << 16; z.writestr(zi, "/etc")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"): safe_extract_zip(tmp_path/"link.zip", tmp_path/"out")
    assert not (tmp_path/"out"/"export").exists()

def test_zip_bomb_cap(tmp_path):
    with zipfile.ZipFile(tmp_path/"big.zip", "w", zipfile.ZIP_DEFLATED) as z: z.writestr("a.txt", b"0" * 2_000_000)
    with pytest.raises(UnsafeArchiveError, match="exceeds the cap"): safe_extract_zip(tmp_path/"big.zip", tmp_path/"out", max_total_bytes=1_000_000)

# ---------- the warehouse ----------
@pytest.fixture
def corpus(tmp_path):
    raw = tmp_path/"raw"
    write_medium(raw/"medium-export", medium_posts()); write_substack(raw/"substack-export", substack_posts())
    write_linkedin(raw/"linkedin-export", linkedin_posts())
    cfg = make_cfg({"Ada Tester": ["medium-export", "substack-export", "linkedin-export"]})
    return raw, tmp_path/"wh", cfg

def test_rerun_is_byte_identical(corpus):
    raw, wh, cfg = corpus
    r1 = run_etl(cfg, raw, wh, now="2026-01-01T00:00:00Z"); b1 = warehouse_file(wh).read_bytes(); m1 = warehouse_file(wh).stat().st_mtime_ns
    r2 = run_etl(cfg, raw, wh, now="2026-02-01T00:00:00Z")
    assert r1["new"] == r1["documents"] == 8 and r1["failures"] == []
    assert (r2["new"], r2["updated"], r2["vanished"], r2["unchanged"]) == (0, 0, 0, 8)
    assert warehouse_file(wh).read_bytes() == b1 and warehouse_file(wh).stat().st_mtime_ns == m1 and not r2["warehouse_changed"]
    df = load_warehouse(wh)
    assert list(df.columns) == ["id", "author", "author_id", "platform", "kind", "title", "url", "published_at", "content", "content_hash",
                                "metadata", "status", "split", "first_seen", "updated_at"]
    assert list(df.id) == sorted(df.id) and set(df.split) <= {"train", "test"} and set(df.first_seen) == {"2026-01-01T00:00:00Z"}
    d = load_documents(wh)[0]
    assert isinstance(d.metadata, dict) and len(d.id) == 16 and d.author == "Ada Tester" and d.author_id == "ada-tester"

def test_edit_updates_exactly_one_row_and_vanished_is_marked(corpus):
    raw, wh, cfg = corpus
    run_etl(cfg, raw, wh, now="2026-01-01T00:00:00Z"); before = read_rows(wh)
    p = sorted((raw/"medium-export"/"posts").glob("*.html"))[1]
    p.write_text(p.read_text().replace("one rule;", "one edited rule;"))
    r = run_etl(cfg, raw, wh, now="2026-01-02T00:00:00Z"); after = read_rows(wh)
    assert (r["new"], r["updated"], r["vanished"], r["unchanged"]) == (0, 1, 0, 7)
    changed = [i for i in after if after[i] != before[i]]
    assert len(changed) == 1
    row, old = after[changed[0]], before[changed[0]]
    assert "one edited rule;" in row["content"] and row["content_hash"] != old["content_hash"]
    assert row["updated_at"] == "2026-01-02T00:00:00Z" and row["first_seen"] == old["first_seen"]
    assert {k for k in row if row[k] != old[k]} == {"content", "content_hash", "updated_at"}
    # a post vanishes from the export: marked, not deleted; a re-run keeps it marked without counting it again
    (raw/"substack-export"/"posts"/"100.issue-0.html").unlink()
    # it was the twin's only `test` document: the strict stage stops (nothing written); strict=False merges the snapshot
    with pytest.raises(DataError, match="none in the `test` split"): run_etl(cfg, raw, wh, now="2026-01-03T00:00:00Z")
    assert read_rows(wh) == after
    r = run_etl(cfg, raw, wh, now="2026-01-03T00:00:00Z", strict=False); rows = read_rows(wh)
    assert r["vanished"] == 1 and r["documents"] == 7 and len(rows) == 8
    gone = [x for x in rows.values() if x["status"] == "vanished"]
    assert len(gone) == 1 and gone[0]["title"] == "Issue 0" and gone[0]["updated_at"] == "2026-01-03T00:00:00Z"
    assert len(load_documents(wh)) == 7 and len(load_documents(wh, status=None)) == 8
    r = run_etl(cfg, raw, wh, now="2026-01-04T00:00:00Z", strict=False); assert r["vanished"] == 0 and r["vanished_total"] == 1

def test_failing_sources_are_reported_and_others_land(corpus):
    from llmtwin_nb.crawl import FixtureSite
    raw, wh, cfg = corpus
    routes = {"/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nAllow: /\n", 0),
              "/down": (500, {"Content-Type": "text/plain"}, b"always broken", 0)}
    with FixtureSite(routes) as site:
        bad = make_cfg({"Ada Tester": [*cfg.sources["Ada Tester"], site.url("/down"), "missing-export", "https://www.linkedin.com/in/ada"]})
        r = run_etl(bad, raw, wh, now="2026-01-01T00:00:00Z", strict=False)
        assert site.hits("/down") == 2          # one try + one retry, then given up
        # the stage itself (strict) refuses the same sources, lists every problem, and writes nothing
        with pytest.raises(DataError) as e: run_etl(bad, raw, tmp_wh := wh.parent/"wh-strict", now="2026-01-01T00:00:00Z")
        assert not tmp_wh.exists() and len(e.value.problems) == 3 and all(s in str(e.value) for s in ("missing-export", "/down", "linkedin.com"))
    reasons = {f["source"]: f["reason"] for f in r["failures"]}
    assert set(reasons) == {site.url("/down"), "missing-export", "https://www.linkedin.com/in/ada"}
    assert "500" in reasons[site.url("/down")] or "server" in reasons[site.url("/down")].lower()
    assert "does not exist" in reasons["missing-export"] and "export" in reasons["https://www.linkedin.com/in/ada"]
    assert r["documents"] == 8 and r["platforms"] == {"linkedin": 3, "medium": 3, "substack": 2}

# ---------- PII on the demo corpus ----------
def test_pii_masks_planted_kinds_in_the_demo_corpus(tmp_path):
    cfg = make_cfg({"Ilse Marchetti": ["medium-export", "substack-export", "linkedin-export", "github/pondlet.bundle"]}, author="Ilse Marchetti")
    r = run_etl(cfg, SAMPLES, tmp_path/"wh", now="2026-01-01T00:00:00Z")
    assert r["failures"] == [] and r["pii_masked"]["email"] >= 1 and r["pii_masked"]["phone"] >= 1 and r["pii_masked"]["secret"] >= 2
    text = "\n".join(d.content for d in load_documents(tmp_path/"wh"))
    for planted in ("ilse@example.com", "+31 6 1234 5678", "sk-test-", "ghp_"): assert planted not in text, planted
    for mark in ("[EMAIL]", "[PHONE]", "[SECRET]"): assert mark in text
    off = cfg.model_copy(update=dict(pii_mask=False))
    r = run_etl(off, SAMPLES, tmp_path/"wh2", now="2026-01-01T00:00:00Z")
    assert r["pii_masked"]["total"] == 0 and "ilse@example.com" in "\n".join(d.content for d in load_documents(tmp_path/"wh2"))

# ---------- git ----------
def git(*args, cwd):
    env = {**os.environ, "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "T",
           "GIT_COMMITTER_EMAIL": "t@example.org", "GIT_AUTHOR_DATE": "2025-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2025-01-01T00:00:00Z"}
    subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=cwd, check=True, capture_output=True, env=env)

@pytest.fixture
def repo(tmp_path):
    r = tmp_path/"toyrepo"; (r/"docs").mkdir(parents=True); (r/"vendor"/"lib").mkdir(parents=True); (r/"node_modules"/"x").mkdir(parents=True)
    (r/"third_party").mkdir(); (r/"pkg").mkdir()
    (r/"README.md").write_text("# Toy\n\nA toy repository with enough words to keep.\n")
    (r/"pkg"/"core.py").write_text("def f(x):\n\treturn x + 1\n")
    (r/"pkg"/"_version.py").write_text("__version__ = '1.0'\n")
    (r/"pkg"/"api_pb2.py").write_text("x = 1\n")
    (r/"pkg"/"gen.py").write_text("# Code generated by protoc. DO NOT EDIT.\nx = 1\n")
    (r/"docs"/"blob.txt").write_bytes(b"text then a NUL\x00byte")
    (r/"docs"/"big.md").write_text("word " * 60_000)
    (r/"vendor"/"lib"/"v.py").write_text("print('vendored')\n"); (r/"node_modules"/"x"/"i.js").write_text("1\n")
    (r/"third_party"/"t.py").write_text("1\n")
    os.symlink("../../../../etc/hostname", r/"docs"/"outside.md"); os.symlink("../README.md", r/"docs"/"inside.md")
    (r/".git_hook_marker").write_text("")
    git("init", "-q", cwd=r); git("add", "-A", cwd=r); git("commit", "-qm", "init", cwd=r)
    # a hook in the source repository must never run (it is not cloned, and hooks are disabled for our git calls)
    (r/".git"/"hooks"/"post-checkout").write_text(f"#!/bin/sh\ntouch {tmp_path}/HOOK_RAN\n"); (r/".git"/"hooks"/"post-checkout").chmod(0o755)
    git("bundle", "create", str(tmp_path/"toyrepo.bundle"), "--all", cwd=r)
    return r

@pytest.mark.parametrize("kind", ["path", "bundle"])
def test_git_importer_skips_what_it_must(repo, kind):
    ctx = ImportContext(make_cfg(["toyrepo"], git_max_file_kb=100))
    src = str(repo) if kind == "path" else str(repo.parent/"toyrepo.bundle")
    docs = import_git(src, ctx)
    assert sorted(d.metadata["path"] for d in docs) == ["README.md", "pkg/core.py"]
    sk = {k: sorted(p.split("/", 1)[1] for p in v) for k, v in ctx.skipped.items()}
    assert sk["symlink"] == ["docs/inside.md", "docs/outside.md"]
    assert sk["binary"] == ["docs/blob.txt"] and sk["oversize"] == ["docs/big.md"]
    assert sk["vendored"] == ["node_modules/x/i.js", "third_party/t.py", "vendor/lib/v.py"]
    assert sk["generated"] == ["pkg/_version.py", "pkg/api_pb2.py", "pkg/gen.py"]
    code = next(d for d in docs if d.metadata["path"] == "pkg/core.py")
    assert code.body == "def f(x):\n\treturn x + 1\n" and code.fmt == "code" and code.published_at == "2025-01-01T00:00:00Z"
    assert all("hostname" not in d.body for d in docs) and not (repo.parent/"HOOK_RAN").exists()
    assert docs[0].title.startswith("toyrepo/")

def test_git_bad_source_is_a_clear_failure(tmp_path):
    (tmp_path/"nota.bundle").write_text("not a bundle")
    docs, failures, _ = collect_sources(["nota.bundle"], tmp_path, CFG)
    assert docs == [] and failures[0]["source"] == "nota.bundle" and "git clone failed" in failures[0]["reason"]

def test_near_duplicate_repost_is_removed(corpus):
    raw, wh, cfg = corpus
    # the Medium post 0 reposted on LinkedIn with its first sentence changed: a near-duplicate, not an exact one
    posts = linkedin_posts() + [dict(date="2024-06-01 08:00:00", url="https://www.linkedin.com/feed/update/urn:li:share:99",
                                     text="Reposting this.\n\n" + body_text(0).split("\n\n", 1)[1])]
    write_linkedin(raw/"linkedin-export", posts)
    r = run_etl(cfg, raw, wh, now="2026-01-01T00:00:00Z")
    assert r["duplicates_removed"] == 1 and r["documents"] == 8
    d = r["duplicates"][0]
    assert d["kind"] == "near" and 0.8 <= d["similarity"] < 1 and d["title"] == "Reposting this."

# ---------- params: sources per author ----------
def test_sources_by_author_and_the_twin_must_be_one_of_them():
    assert make_cfg("a, b").sources == {"Ada Tester": ["a", "b"]}                     # a plain list is the twin's
    assert make_cfg({"Ada Tester": "a", "Bo": ["b", "c"]}).sources == {"Ada Tester": ["a"], "Bo": ["b", "c"]}
    for kw, msg in [(dict(sources={"Bo": ["b"]}), "`data.author` = 'Ada Tester'.*must be one of the authors in data.sources \\('Bo'\\)"),
                    (dict(sources={"Ada Tester": ["a"], "Bo": ["a"]}), "source 'a' is listed twice"),
                    (dict(sources={"Ada Tester": []}), "has no sources"),
                    (dict(sources={"Ada Tester": ["a"]}, pii_kinds=5), "pii_kinds")]:
        with pytest.raises(ParamsError, match=msg): section_params("data", {"author": "Ada Tester", **kw})
    with pytest.raises(ParamsError, match="data.author.*Field required"): section_params("data", {"sources": {"Ada": ["a"]}})
    with pytest.raises(ParamsError, match="data.sources.*Field required"): section_params("data", {"author": "Ada"})

# ---------- authors ----------
def book_record(i, author=None, text=None, **kw):
    r = dict(_id={"$oid": f"65b{i:03d}"}, content=dict(Title=f"Book post {i}", Content=text if text is not None else
             f"Body of book post {i}: " + " ".join(f"bk{i}w{j}" for j in range(40))), platform="medium", link=f"https://medium.com/@b/p{i}", **kw)
    if author: r["author_full_name"] = author
    return r

def test_documents_take_their_sources_author_unless_the_record_names_one(tmp_path):
    raw = tmp_path/"raw"
    write_medium(raw/"ada-medium", medium_posts())                      # the export names "Ada Tester" too
    write_linkedin(raw/"bo-linkedin", linkedin_posts(), first="Robert", last="B.")   # the profile spells the name differently
    recs = [book_record(0, "Bo Writer"), book_record(1, "Cy Guest"), book_record(2)]  # a multi-author book export
    (raw/"bo.json").write_text(json.dumps(recs))
    cfg = make_cfg({"Ada Tester": ["ada-medium"], "Bo Writer": ["bo-linkedin", "bo.json"]}, test_fraction=0.5)
    raws, failures, per_source = collect_sources(cfg.sources, raw, cfg)
    assert failures == [] and per_source == {"ada-medium": 3, "bo-linkedin": 3, "bo.json": 3}
    by_source = {(r.source, r.title): r.author for r in raws}
    assert {a for (s, _), a in by_source.items() if s == "ada-medium"} == {"Ada Tester"}
    assert {a for (s, _), a in by_source.items() if s == "bo-linkedin"} == {"Bo Writer"}       # the mapping wins for an account export
    assert all(r.metadata["named_author"] == "Robert B." for r in raws if r.source == "bo-linkedin")
    assert [by_source[("bo.json", f"Book post {i}")] for i in range(3)] == ["Bo Writer", "Cy Guest", "Bo Writer"]  # the record's own author
    r = run_etl(cfg, raw, tmp_path/"wh", now="2026-01-01T00:00:00Z", strict=False)
    assert r["twin"] == "Ada Tester" and r["authors"] == {"Ada Tester": 3, "Bo Writer": 5, "Cy Guest": 1}
    assert sum(r["twin_splits"].values()) == 3
    assert {d.author for d in load_documents(tmp_path/"wh", author="Bo Writer")} == {"Bo Writer"}
    assert len(load_documents(tmp_path/"wh", author="Cy Guest")) == 1
    with pytest.raises(ValueError, match="no documents by 'Nobody'.*'Ada Tester', 'Bo Writer', 'Cy Guest'"):
        load_documents(tmp_path/"wh", author="Nobody")

# ---------- Markdown front matter ----------
def test_front_matter_is_read_and_removed(tmp_path):
    n = tmp_path/"notes"; n.mkdir()
    (n/"2024-05-01-retro.md").write_text('---\ntitle: "Retro: the label party"\ndate: 2024-05-01\ntags: [evals, llm]\nauthor: Guest Writer\n'
                                         'draft: true\n---\n# A different heading\n\nWe labelled 400 examples.\n')
    (n/"heading.md").write_text("---\ndate: 2024-06-02 10:30:00 +0200\ntags: evals, rag\n---\n\n# From the heading\n\nText.\n")
    (n/"no-title_here.md").write_text("---\n---\nJust text.\n")
    (n/"win.md").write_bytes(b"\xef\xbb\xbf---\r\ntitle: Windows\r\ndate: March 5, 2024\r\n---\r\nCRLF text.\r\n")
    got = {r.metadata["path"]: r for r in import_local_folder(n)}
    a = got["2024-05-01-retro.md"]
    assert (a.title, a.published_at, a.author, a.metadata["tags"], a.metadata["draft"]) == \
           ("Retro: the label party", "2024-05-01T00:00:00Z", "Guest Writer", ["evals", "llm"], True)
    assert a.body == "# A different heading\n\nWe labelled 400 examples.\n"
    b = got["heading.md"]
    assert (b.title, b.published_at, b.author, b.metadata["tags"]) == ("From the heading", "2024-06-02T08:30:00Z", None, ["evals", "rag"])
    assert got["no-title_here.md"].title == "no title here" and got["no-title_here.md"].body == "Just text.\n"
    assert (got["win.md"].title, got["win.md"].published_at, got["win.md"].body) == ("Windows", "2024-03-05T00:00:00Z", "CRLF text.\n")
    assert split_front_matter("# Title\n---\nnot: front matter\n---\n") == ({}, "# Title\n---\nnot: front matter\n---\n")

@pytest.mark.parametrize("text,msg", [("---\ntitle: a: b\n---\nx\n", "front matter .* is not valid YAML.*line 2"),
                                      ("---\n- a\n- b\n---\nx\n", "front matter must be `key: value` lines"),
                                      ("---\ndate: someday\n---\nx\n", "`date: someday` is not a date"),
                                      ("---\ntitle: Only metadata\n---\n\n", "has no text after its front matter")])
def test_bad_front_matter_names_the_file(tmp_path, text, msg):
    (tmp_path/"n").mkdir(); (tmp_path/"n"/"ok.md").write_text("Fine text.\n"); (tmp_path/"n"/"bad.md").write_text(text)
    with pytest.raises(SourceError, match=msg) as e: import_local_folder(tmp_path/"n")
    assert e.value.source.endswith("bad.md")

# ---------- bad input stops the stage before anything is written ----------
def write_notes(folder: Path, n: int = 10):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder/f"note-{i}.md").write_text(f"---\ntitle: Note {i}\ndate: 2024-01-{i + 1:02d}\n---\n" + " ".join(f"n{i}w{j}" for j in range(40)) + "\n")

@pytest.fixture
def good_warehouse(tmp_path):
    "A warehouse from a good run (10 notes by Ada), its bytes and mtime."
    raw, wh = tmp_path/"raw", tmp_path/"wh"; write_notes(raw/"notes")
    r = run_etl(make_cfg({"Ada Tester": ["notes"]}), raw, wh, now="2026-01-01T00:00:00Z")
    assert r["problems"] == [] and r["documents"] == 10 and set(r["twin_splits"]) == {"train", "test"}
    f = warehouse_file(wh)
    return raw, wh, f.read_bytes(), f.stat().st_mtime_ns

DEEP = b"[" * 100_000 + b"]" * 100_000
BAD_INPUTS = {   # case: (files to write under raw/, extra sources {author: [source]}, text the error must contain)
    "binary": ({"x.json": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"}, None, ["x.json", "a binary file", "not the book's MongoDB export"]),
    "not_utf8": ({"x.json": '[{"content": {"Content": "Caf\u00e9"}}]'.encode("latin-1")}, None, ["x.json", "not UTF-8 text (byte 0xe9 at offset", "re-save it as UTF-8"]),
    "not_utf8_note": ({"more/a.md": "Caf\u00e9 au lait".encode("cp1252")}, {"Ada Tester": ["more"]}, ["more: more/a.md: not UTF-8 text", "UTF-8 markdown"]),
    "malformed_json": ({"x.json": b'[{"content": {"Content": "hi"}},\n {"content": '}, None, ["x.json", "not valid JSON", "line 2", "JSON array of records"]),
    "malformed_jsonl": ({"x.jsonl": b'{"content": "ok text"}\n{"content": "broken\n'}, {"Ada Tester": ["x.jsonl"]}, ["x.jsonl", "line 2 is not valid JSON"]),
    "deep_json": ({"x.json": DEEP}, None, ["x.json", "nested deeper than", "levels"]),
    "empty_array": ({"x.json": b"[]"}, None, ["x.json", "no records (an empty export)"]),
    "empty_file": ({"x.json": b""}, None, ["x.json", "the file is empty"]),
    "empty_folder": ({"more/readme.pdf": b"%PDF"}, {"Ada Tester": ["more"]}, ["more", "no .md, .markdown, .txt, .html, .htm files"]),
    "empty_export": ({"sub/posts.csv": b"post_id,title\n"}, {"Ada Tester": ["sub"]}, ["sub", "found no documents"]),
    "record_without_text": ({"x.json": json.dumps([book_record(0, "Ada Tester"), book_record(1, "Ada Tester", text="  ")]).encode()}, None,
                            ["x.json", "record 1 (_id 65b001) has no text"]),
    "record_without_content": ({"x.json": json.dumps([{"_id": "z9", "platform": "medium"}]).encode()}, None, ["x.json", "record 0 (_id z9) has no `content`"]),
    "record_not_an_object": ({"x.json": b"[1, 2]"}, None, ["x.json", "record 0 is a JSON number"]),
    "author_without_documents": ({"x.json": json.dumps([book_record(i, "Robert B.") for i in range(3)]).encode()}, {"Bo Writer": ["x.json"]},
                                 ["author 'Bo Writer' has no documents", "'Robert B.': 3", "use that exact name"]),
    "all_filtered_out": ({"x.json": json.dumps([book_record(0, text="Too short.")]).encode()}, None,
                         ["x.json: none of its 1 documents passed the filters", "1 too short", "data.min_words=20"]),
}

@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_before_writing(good_warehouse, case):
    raw, wh, before, mtime = good_warehouse
    files, extra, expected = BAD_INPUTS[case]
    for name, data in files.items(): (raw/name).parent.mkdir(parents=True, exist_ok=True); (raw/name).write_bytes(data)
    sources = {"Ada Tester": ["notes"]}                     # the good notes stay in; the bad source joins them
    for a, s in (extra or {"Ada Tester": ["x.json"]}).items(): sources[a] = sources.get(a, []) + s
    with pytest.raises(DataError) as e: run_etl(make_cfg(sources), raw, wh, now="2026-02-01T00:00:00Z")
    msg = str(e.value); print(msg)
    for s in expected: assert s in msg, (s, msg)
    assert "stopped before writing the warehouse" in msg
    f = warehouse_file(wh)
    assert f.read_bytes() == before and f.stat().st_mtime_ns == mtime and [p.name for p in wh.iterdir()] == ["documents.parquet"]

def test_twin_without_a_test_document_stops(tmp_path):
    write_notes(tmp_path/"notes", 1)
    with pytest.raises(DataError, match="the twin 'Ada Tester' has 1 documents and none in the `(test|train)` split"):
        run_etl(make_cfg(["notes"]), tmp_path, tmp_path/"wh")
    assert not (tmp_path/"wh").exists()

def test_bad_file_inside_a_zip_is_named_inside_the_zip(tmp_path):
    (tmp_path/"n").mkdir(); (tmp_path/"n"/"ok.md").write_text("Fine text.\n"); (tmp_path/"n"/"bad.md").write_bytes(b"\x00\x01binary")
    zip_folder(tmp_path/"n", tmp_path/"notes.zip")
    _, failures, _ = collect_sources(["notes.zip"], tmp_path, CFG)
    assert failures == [dict(source="notes.zip", reason=failures[0]["reason"])] and failures[0]["reason"].startswith("notes.zip:n/bad.md: a binary file")

def test_readme_own_writing_example_with_a_one_platform_export(tmp_path):
    "The README's 'Use your own writing' YAML, as written: a new twin whose only export is one platform's book-format JSON."
    import re, shutil, yaml
    readme = (get_paths().root/"README.md").read_text()
    section = readme.split("## Use your own writing", 1)[1].split("\n## ", 1)[0]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))["data"]
    twin, (export,) = example["author"], example["sources"][example["author"]]
    raw = tmp_path/"data"
    for author, sources in example["sources"].items():          # the other authors' exports: the shipped samples
        for s in sources if author != twin else []:
            (raw/s).parent.mkdir(parents=True, exist_ok=True)
            if (SAMPLES/s).is_dir(): shutil.copytree(SAMPLES/s, raw/s)
            else: shutil.copy2(SAMPLES/s, raw/s)
    records = [dict(r, author_full_name=twin) for r in json.loads((SAMPLES/"marisol-vega"/"warehouse.json").read_text())
               if r["platform"] == "medium"]                      # one platform only
    (raw/export).parent.mkdir(parents=True, exist_ok=True); (raw/export).write_text(json.dumps(records))
    cfg = section_params("data", {**FAST, "author": twin, "sources": example["sources"]})
    r = run_etl(cfg, raw, tmp_path/"wh", now="2026-01-01T00:00:00Z")
    assert r["twin"] == twin and r["authors"][twin] == len(records) and len(r["authors"]) == len(example["sources"])
    assert r["twin_splits"]["train"] > 0 and r["twin_splits"]["test"] > 0
    assert {d.platform for d in load_documents(tmp_path/"wh", author=twin)} == {"medium"}
