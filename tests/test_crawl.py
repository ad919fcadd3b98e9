"""The HTTP crawler (nbs/01a_crawl.ipynb) against a real loopback server with faults.

Every test runs `llmtwin_nb.crawl.FixtureSite` (a ThreadingHTTPServer on 127.0.0.1, port 0) and checks the
crawler's behaviour on the wire through the server's request log: how many attempts, how long apart, which
paths were (never) requested, what User-Agent arrived, how many bytes the server managed to push.
Delays and timeouts are scaled down so the whole file runs in a few seconds.
"""

import dataclasses
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from bs4 import BeautifulSoup

from llmtwin_nb.crawl import (FIXTURE_PAGES, CrawlPolicy, CrawlSession, FetchError, FixtureSite, HostThrottle,
                              crawl_article, crawl_many, detect_platform, extract_main_content, fetch,
                              parse_retry_after)

FAST = CrawlPolicy(timeout_s=0.4, max_retries=2, backoff_s=0.05, max_retry_after_s=5.0, max_bytes=200_000,
                   max_redirects=3, per_host_delay_s=0.0, respect_robots=True)
PAGE = "<html><body><article><p>The paragraph that matters, long enough to count as content.</p></article></body></html>"


def text(html: str) -> str:
    return BeautifulSoup(html, "html.parser").get_text(" ", strip=True)


def fail(url, policy=FAST, session=None) -> FetchError:
    with pytest.raises(FetchError) as ei:
        fetch(url, policy, session)
    return ei.value


# --- timeouts and retries ---------------------------------------------------------------------------------

def test_slow_page_times_out_after_retries_in_bounded_time():
    with FixtureSite({"/slow": (200, {}, PAGE, 5.0)}) as site:
        t = time.monotonic()
        e = fail(site.url("/slow"))
        elapsed = time.monotonic() - t
        assert e.reason == "timeout" and e.attempts == FAST.max_retries + 1
        assert site.hits("/slow") == FAST.max_retries + 1
        # 3 attempts x 0.4 s + backoffs (<= 0.05 + 0.1): well under the server's 5 s delay
        assert 3 * FAST.timeout_s <= elapsed < 3 * FAST.timeout_s + 1.0, elapsed
        assert "timeout_s" in e.message and str(site.url("/slow")) == e.url


def test_slow_drip_body_is_bounded_by_timeout():
    def drip():
        for _ in range(100):
            time.sleep(0.05)
            yield b"<p>drop</p>"
    with FixtureSite({"/drip": (200, {"Content-Type": "text/html"}, drip)}) as site:
        t = time.monotonic()
        e = fail(site.url("/drip"), dataclasses.replace(FAST, max_retries=0))
        assert e.reason == "timeout" and time.monotonic() - t < 1.5


def test_429_with_retry_after_waits_then_succeeds():
    routes = {"/busy": [(429, {"Retry-After": "1"}, "slow down"), (200, {}, PAGE)]}
    with FixtureSite(routes) as site:
        t = time.monotonic()
        page = fetch(site.url("/busy"), FAST)
        assert time.monotonic() - t >= 1.0
        assert page.status == 200 and "paragraph that matters" in page.html
        first, second = site.requests("/busy")
        assert second["t"] - first["t"] >= 0.95  # the server saw the wait too
        assert site.hits("/busy") == 2


def test_retry_after_beyond_cap_fails_at_once():
    with FixtureSite({"/later": (503, {"Retry-After": "3600"}, "maintenance")}) as site:
        t = time.monotonic()
        e = fail(site.url("/later"))
        assert e.reason == "http_status" and e.status == 503 and "max_retry_after_s" in e.message
        assert site.hits("/later") == 1 and time.monotonic() - t < 1.0


def test_parse_retry_after_forms():
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now) == 90.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=90), usegmt=True), now=now) == 0.0
    assert parse_retry_after("tomorrow") is None and parse_retry_after(None) is None


def test_500_recovers_on_retry():
    with FixtureSite({"/flaky": [500, 502, (200, {}, PAGE)]}) as site:
        page = fetch(site.url("/flaky"), FAST)
        assert page.status == 200 and site.hits("/flaky") == 3


def test_500_that_never_recovers_fails_after_max_retries_plus_one():
    with FixtureSite({"/down": (500, {}, "broken")}) as site:
        e = fail(site.url("/down"))
        assert e.reason == "http_status" and e.status == 500
        assert site.hits("/down") == FAST.max_retries + 1 == e.attempts


def test_404_is_not_retried():
    with FixtureSite({}) as site:
        e = fail(site.url("/nope"))
        assert e.reason == "http_status" and e.status == 404 and site.hits("/nope") == 1


def test_connection_refused_is_a_connection_error():
    with FixtureSite({}) as site:
        url = site.url("/x")
    e = fail(url, dataclasses.replace(FAST, max_retries=1, respect_robots=False))  # server closed: nothing listens
    assert e.reason == "connection" and e.attempts == 2


# --- content: malformed HTML, charsets, size, type --------------------------------------------------------

def test_malformed_html_still_extracts():
    broken = ("<html><body><nav><a href='/'>Home</a></nav><div class=post><p>First paragraph, with <b>unclosed bold"
              "<p>Second paragraph never closed</span><div><p>Third, inside an unclosed div")
    with FixtureSite({"/broken": (200, {}, broken)}) as site:
        art = crawl_article(site.url("/broken"), FAST)
    t = text(art.html)
    assert "First paragraph" in t and "Second paragraph never closed" in t and "Third, inside" in t
    assert "Home" not in t


CURLY = "“Curly quotes” and café – naïve"


def test_windows_1252_declared_only_in_meta():
    body = (b'<html><head><meta charset="windows-1252"><title>t</title></head><body><p>'
            + CURLY.encode("cp1252") + b"</p></body></html>")
    with FixtureSite({"/cp": (200, {"Content-Type": "text/html"}, body)}) as site:
        page = fetch(site.url("/cp"), FAST)
    assert page.encoding == "cp1252" and CURLY in page.html and "\ufffd" not in page.html


def test_http_equiv_meta_charset():
    body = (b'<html><head><meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1"></head><body><p>'
            + CURLY.encode("cp1252") + b"</p></body></html>")
    with FixtureSite({"/he": (200, {"Content-Type": "text/html"}, body)}) as site:
        page = fetch(site.url("/he"), FAST)
    assert page.encoding == "cp1252" and CURLY in page.html


def test_latin1_declared_only_in_header_decodes_as_windows_1252():
    body = b"<html><body><p>" + CURLY.encode("cp1252") + b"</p></body></html>"
    with FixtureSite({"/l1": (200, {"Content-Type": "text/html; charset=ISO-8859-1"}, body)}) as site:
        page = fetch(site.url("/l1"), FAST)
    assert page.encoding == "cp1252" and CURLY in page.html


def test_header_charset_wins_and_undeclared_falls_back_to_utf8_with_replacement():
    body = CURLY.encode("cp1252")
    with FixtureSite({"/u": (200, {"Content-Type": "text/html"}, body),
                      "/ok8": (200, {"Content-Type": "text/html; charset=utf-8"}, CURLY.encode())}) as site:
        bad = fetch(site.url("/u"), FAST)
        good = fetch(site.url("/ok8"), FAST)
    assert bad.encoding == "utf-8" and "\ufffd" in bad.html and "caf" in bad.html
    assert good.html == CURLY


def test_oversized_streamed_page_stops_early():
    total = 64 * 1024 * 800  # 52 MB, sent in 64 KiB chunks with no Content-Length
    stream = lambda: (b"x" * 65536 for _ in range(800))
    with FixtureSite({"/huge": (200, {"Content-Type": "text/html"}, stream)}) as site:
        e = fail(site.url("/huge"))
        site.wait_idle("/huge")
        sent = site.requests("/huge")[0]["bytes_sent"]
    assert e.reason == "too_large" and "max_bytes" in e.message
    assert FAST.max_bytes < e.bytes_read <= FAST.max_bytes + 65536 * 4
    assert sent < total / 2, sent  # we hung up: the server could not push the rest
    assert site.hits("/huge") == 1  # not retried


def test_declared_content_length_over_cap_is_not_downloaded():
    with FixtureSite({"/big": (200, {}, b"y" * (FAST.max_bytes + 1))}) as site:
        e = fail(site.url("/big"))
    assert e.reason == "too_large" and e.bytes_read == 0 and "Content-Length" in e.message


def test_non_html_content_type_is_refused():
    with FixtureSite({"/img": (200, {"Content-Type": "image/png"}, b"\x89PNG....")}) as site:
        e = fail(site.url("/img"))
    assert e.reason == "decode" and "image/png" in e.message


# --- redirects ----------------------------------------------------------------------------------------------

def test_redirect_loop():
    routes = {"/a": (302, {"Location": "/b"}), "/b": (301, {"Location": "/a"})}
    with FixtureSite(routes) as site:
        e = fail(site.url("/a"))
        assert e.reason == "redirect_loop" and "loop" in e.message and e.url == site.url("/a")
        assert site.hits("/a") == 1 and site.hits("/b") == 1


def test_redirect_chain_longer_than_cap():
    routes = {f"/r{i}": (307, {"Location": f"/r{i + 1}"}) for i in range(10)}
    with FixtureSite(routes) as site:
        e = fail(site.url("/r0"))
        assert e.reason == "redirect_loop" and "max_redirects=3" in e.message
        assert [site.hits(f"/r{i}") for i in range(6)] == [1, 1, 1, 1, 0, 0]  # max_redirects + 1 requests


def test_redirect_chain_within_cap_lands():
    routes = {"/old": (301, {"Location": "/older"}), "/older": (308, {"Location": "/post#frag"}), "/post": (200, {}, PAGE)}
    with FixtureSite(routes) as site:
        page = fetch(site.url("/old"), FAST)
        assert page.final_url == site.url("/post") and page.url == site.url("/old") and page.status == 200


# --- robots.txt, throttle, user agent ------------------------------------------------------------------------

def test_robots_disallow_is_never_requested_and_robots_read_once():
    routes = {"/robots.txt": (200, {"Content-Type": "text/plain"}, "User-agent: *\nDisallow: /private/\n"),
              "/private/page": (200, {}, PAGE), "/public/a": (200, {}, PAGE), "/public/b": (200, {}, PAGE)}
    with FixtureSite(routes) as site, CrawlSession() as session:
        e = fail(site.url("/private/page"), session=session)
        fetch(site.url("/public/a"), FAST, session)
        fetch(site.url("/public/b"), FAST, session)
        assert e.reason == "robots_disallowed" and "robots.txt" in e.message
        assert site.hits("/private/page") == 0 and site.hits("/robots.txt") == 1
        # a redirect into a disallowed path is stopped too
        site.routes["/jump"] = (302, {"Location": "/private/page"})
        assert fail(site.url("/jump"), session=session).reason == "robots_disallowed"
        assert site.hits("/private/page") == 0
        # respect_robots=False is the owner's override
        assert fetch(site.url("/private/page"), dataclasses.replace(FAST, respect_robots=False)).status == 200


def test_robots_for_our_agent_only():
    robots = "User-agent: llmtwin-nb\nDisallow: /\n\nUser-agent: *\nAllow: /\n"
    with FixtureSite({"/robots.txt": robots, "/p": PAGE}) as site:
        assert fail(site.url("/p")).reason == "robots_disallowed"
        assert fetch(site.url("/p"), dataclasses.replace(FAST, user_agent="otherbot/1.0")).status == 200


def test_robots_5xx_means_disallow_all():
    with FixtureSite({"/robots.txt": (503, {}, "down"), "/p": PAGE}) as site:
        e = fail(site.url("/p"))
        assert e.reason == "robots_disallowed" and "RFC 9309" in e.message
        assert site.hits("/p") == 0 and site.hits("/robots.txt") == FAST.max_retries + 1


def test_missing_robots_allows():
    with FixtureSite({"/p": PAGE}) as site:
        assert fetch(site.url("/p"), FAST).status == 200 and site.hits("/robots.txt") == 1


def test_per_host_delay_between_fetches():
    policy = dataclasses.replace(FAST, per_host_delay_s=0.4)
    with FixtureSite({"/one": PAGE, "/two": PAGE}) as site, CrawlSession(throttle=HostThrottle()) as session:
        t = time.monotonic()
        fetch(site.url("/one"), policy, session)
        fetch(site.url("/two"), policy, session)
        times = [e["t"] for e in site.log]  # robots.txt, /one, /two, on the server's clock
    assert [e["path"] for e in site.log] == ["/robots.txt", "/one", "/two"]
    assert all(b - a >= 0.4 for a, b in zip(times, times[1:])), times
    assert time.monotonic() - t >= 0.8


def test_per_host_delay_holds_across_threads_and_hosts_run_in_parallel():
    policy = dataclasses.replace(FAST, per_host_delay_s=0.25, respect_robots=False)
    with FixtureSite({f"/p{i}": PAGE for i in range(4)}) as a, FixtureSite({"/q": PAGE}) as b:
        urls = [a.url(f"/p{i}") for i in range(4)] + [b.url("/q")]
        articles, failures = crawl_many(urls, policy, throttle=HostThrottle(), max_workers=5)
        times = sorted(e["t"] for e in a.log)
        assert not failures and len(articles) == 5
        assert all(y - x >= 0.25 for x, y in zip(times, times[1:])), times
        assert b.log[0]["t"] < times[-1] - 0.25  # the other host did not queue behind all of the first's requests


def test_host_throttle_is_thread_safe():
    th, spans, lock = HostThrottle(), [], threading.Lock()
    def go():
        with th.slot("h", 0.1):
            start = time.monotonic(); time.sleep(0.02)
            with lock: spans.append((start, time.monotonic()))
    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads: t.start()
    for t in threads: t.join()
    spans.sort()
    assert all(s2 - e1 >= 0.1 for (_, e1), (s2, _) in zip(spans, spans[1:])), spans  # never overlapping, always apart


def test_user_agent_seen_by_server():
    with FixtureSite({"/p": PAGE}) as site:
        fetch(site.url("/p"), FAST)
        assert {e["user_agent"] for e in site.log} == {FAST.user_agent}
        assert FAST.user_agent.startswith("llmtwin-nb/")


# --- platforms, extraction, crawl_many ---------------------------------------------------------------------

@pytest.mark.parametrize("url,reason,words", [
    ("https://www.linkedin.com/posts/ada_rag-activity-123", "login_required", ["login", "Shares.csv"]),
    ("https://linkedin.com/in/ada", "login_required", ["export"]),
    ("https://github.com/ada/pondlet", "use_git", ["git clone"]),
    ("ftp://example.com/post", "bad_url", ["http"]),
    ("javascript:alert(1)", "bad_url", ["http"]),
    ("https:///nohost", "bad_url", ["host"]),
])
def test_refused_urls(url, reason, words):
    with pytest.raises(FetchError) as ei:
        crawl_article(url, FAST)
    assert ei.value.reason == reason and ei.value.url == url
    assert all(w in ei.value.message for w in words), ei.value.message


def test_detect_platform():
    assert detect_platform("https://medium.com/@ada/p-1") == "medium"
    assert detect_platform("https://ada.medium.com/p-1") == "medium"
    assert detect_platform("https://ada.substack.com/p/x") == "substack"
    assert detect_platform("https://notmedium.com/p") == "web"
    assert detect_platform("https://medium.com.evil.example/p") == "web"


def test_fixture_pages_extract_without_noise():
    med = extract_main_content(FIXTURE_PAGES["/medium/why-rerank"], "https://medium.com/x")
    sub = extract_main_content(FIXTURE_PAGES["/substack/p/quantization"], "https://a.substack.com/p/q")
    blog = extract_main_content(FIXTURE_PAGES["/blog/tokenizers"], "https://a.example/b")
    assert med.published_at == "2024-03-05T09:30:00+00:00" and med.canonical_url.startswith("https://medium.com/@ada")
    assert sub.author == "Ada Example" and sub.published_at == "2024-05-01T12:00:00+00:00"
    assert blog.published_at == "2023-11-20" and blog.method == "density"
    for ex, keep, drop in [(med, "recall at five", ["Sign in", "Share on X", "claps", "More from"]),
                           (sub, "factor of three", ["Subscribe", "Share", "Discussion"]),
                           (blog, "Byte-pair encoding", ["cookies", "Archive", "Related posts", "RSS"])]:
        t = text(ex.html)
        assert keep in t and not [d for d in drop if d in t], (ex.title, t)


def test_crawl_many_mix_keeps_good_pages_and_names_every_failure():
    routes = {**FIXTURE_PAGES, "/robots.txt": "User-agent: *\nDisallow: /drafts/\n",
              "/down": (500, {}, "x"), "/drafts/p": PAGE, "/slow": (200, {}, PAGE, 5.0),
              "/loop": (302, {"Location": "/loop"}), "/empty": "<html><body><nav>Home</nav></body></html>"}
    with FixtureSite(routes) as site:
        good = [site.url(p) for p in FIXTURE_PAGES]
        bad = {site.url("/down"): "http_status", site.url("/drafts/p"): "robots_disallowed",
               site.url("/slow"): "timeout", site.url("/loop"): "redirect_loop", site.url("/empty"): "no_content",
               site.url("/missing"): "http_status", "https://www.linkedin.com/in/ada": "login_required",
               "https://github.com/ada/pondlet": "use_git", "mailto:ada@example.com": "bad_url"}
        urls = [u for pair in zip(good + [None] * 9, bad) for u in pair if u]  # interleave good and bad
        t = time.monotonic()
        articles, failures = crawl_many(urls, FAST)
        assert time.monotonic() - t < 5
        assert site.hits("/drafts/p") == 0
    assert [a.url for a in articles] == good  # input order
    assert [a.title for a in articles] == ["Why your RAG pipeline needs a reranker", "Quantization on a laptop",
                                           "Notes on tokenizers"]
    assert all(a.platform == "web" and a.final_url == a.url and a.fetched_at for a in articles)
    assert {f["url"]: f["reason"] for f in failures} == bad
    assert all(f["message"] for f in failures) and len(failures) == len(bad)


def test_policy_validation():
    for bad in [dict(timeout_s=0), dict(max_bytes=-1), dict(max_retries=1.5), dict(per_host_delay_s=-0.1),
                dict(user_agent=""), dict(respect_robots="yes")]:
        with pytest.raises(ValueError, match=list(bad)[0]):
            CrawlPolicy(**bad)
    with pytest.raises(TypeError, match="CrawlPolicy"):
        fetch("https://example.com", {"timeout_s": 1})
    with pytest.raises(TypeError, match="list of URLs"):
        crawl_many("https://example.com", FAST)
