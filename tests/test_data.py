"""Chapter 1 (data): importers round-trip their formats, archives are extracted safely, the warehouse's
change-data-capture is exact, failing sources are reported without losing the others, PII is masked, and the
git importer never follows links or imports binaries, vendored, generated or oversize files."""
import csv, json, os, subprocess, zipfile
from pathlib import Path

import pytest

from llmtwin_nb.core import get_paths
from llmtwin_nb.data import (DataParams, UnsafeArchiveError, collect_sources, import_book_export, import_git,
                             import_linkedin_export, import_local_folder, import_medium_export, import_substack_export,
                             ImportContext, load_documents, load_warehouse, read_rows, run_etl, safe_extract_zip,
                             warehouse_file)

SAMPLES = get_paths().root/"samples"
CFG = DataParams(crawl_max_retries=1, crawl_backoff_s=0.01, crawl_per_host_delay_s=0.0, crawl_timeout_s=3)

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
    cfg = CFG.model_copy(update=dict(sources=["medium-export", "substack-export", "linkedin-export"], author="Ada Tester"))
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
    r = run_etl(cfg, raw, wh, now="2026-01-03T00:00:00Z"); rows = read_rows(wh)
    assert r["vanished"] == 1 and r["documents"] == 7 and len(rows) == 8
    gone = [x for x in rows.values() if x["status"] == "vanished"]
    assert len(gone) == 1 and gone[0]["title"] == "Issue 0" and gone[0]["updated_at"] == "2026-01-03T00:00:00Z"
    assert len(load_documents(wh)) == 7 and len(load_documents(wh, status=None)) == 8
    r = run_etl(cfg, raw, wh, now="2026-01-04T00:00:00Z"); assert r["vanished"] == 0 and r["vanished_total"] == 1

def test_failing_sources_are_reported_and_others_land(corpus):
    from llmtwin_nb.crawl import FixtureSite
    raw, wh, cfg = corpus
    routes = {"/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nAllow: /\n", 0),
              "/down": (500, {"Content-Type": "text/plain"}, b"always broken", 0)}
    with FixtureSite(routes) as site:
        bad = cfg.model_copy(update=dict(sources=[*cfg.sources, site.url("/down"), "missing-export", "https://www.linkedin.com/in/ada"]))
        r = run_etl(bad, raw, wh, now="2026-01-01T00:00:00Z")
        assert site.hits("/down") == 2          # one try + one retry, then given up
    reasons = {f["source"]: f["reason"] for f in r["failures"]}
    assert set(reasons) == {site.url("/down"), "missing-export", "https://www.linkedin.com/in/ada"}
    assert "500" in reasons[site.url("/down")] or "server" in reasons[site.url("/down")].lower()
    assert "does not exist" in reasons["missing-export"] and "export" in reasons["https://www.linkedin.com/in/ada"]
    assert r["documents"] == 8 and r["platforms"] == {"linkedin": 3, "medium": 3, "substack": 2}

# ---------- PII on the demo corpus ----------
def test_pii_masks_planted_kinds_in_the_demo_corpus(tmp_path):
    cfg = DataParams()
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
    ctx = ImportContext(DataParams(git_max_file_kb=100))
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
