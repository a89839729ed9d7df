"""IMDb review scraper: parsing the fixture pages, pagination, cache, politeness and failures, all offline.

Over 400 lines: one fixture site and fake clock serve every case; split, each file would rebuild them.

The site is an httpx.MockTransport serving tests/fixtures/imdb; a fake clock stands in for time, so nothing sleeps.
"""

import re

import httpx
import pytest

from stages.sources.imdb_scraper import (
    USER_AGENT,
    ImdbReviewScraper,
    MovieReviews,
    PageParseError,
    RefusedError,
    Review,
    ScrapeError,
    parse_reviews_page,
)
from tests.conftest import FIXTURES

PAGES = FIXTURES / "imdb"
MOVIE = "tt0109127"
ROBOTS = "https://www.imdb.com/robots.txt"
PAGE1 = f"https://www.imdb.com/title/{MOVIE}/reviews/"
PAGE2 = f"https://www.imdb.com/title/{MOVIE}/reviews/_ajax?paginationKey=g4wp7cbkpq-page2"
PAGE3 = f"https://www.imdb.com/title/{MOVIE}/reviews/_ajax?paginationKey=g4wp7cbkpq-page3"

REVIEW_1 = Review(
    review_id="rw1000001",
    rating=10,
    helpful_yes=1234,
    helpful_total=1500,
    title="A masterpiece & then some",
    text="First line of the review.\nSecond paragraph, with emphasis.\nThird line.",
    author="film_fan",
    date="12 March 2004",
)
REVIEW_2 = Review(
    review_id="rw1000002",
    rating=None,
    helpful_yes=None,
    helpful_total=None,
    title="No rating here",
    text="Short text.",
    author="quiet_viewer",
    date="1 January 1995",
)
REVIEW_3 = Review(
    review_id="rw1000003",
    rating=3,
    helpful_yes=0,
    helpful_total=7,
    title="Overrated",
    text="Too long.",
    author="grump",
    date="5 May 2010",
)
REVIEW_4 = Review(
    review_id="rw1000004",
    rating=7,
    helpful_yes=2,
    helpful_total=2,
    title="Fine",
    text="The end.",
    author="last_one",
    date="9 September 2019",
)


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def page(name: str):
    html = (PAGES / name).read_text()
    return lambda request: httpx.Response(200, text=html, headers={"Content-Type": "text/html; charset=utf-8"})


def reply(status: int, text: str = "", **headers):
    return lambda request: httpx.Response(
        status, text=text, headers={k.replace("_", "-"): v for k, v in headers.items()}
    )


class FakeSite:
    """A MockTransport handler: URL -> a reply, or a list of replies/exceptions served in turn (the last repeats).

    Unknown URLs get a 404. Every request is recorded with the fake time it was made at.
    """

    def __init__(self, clock: FakeClock, routes: dict | None = None):
        self.clock = clock
        self.routes = {
            ROBOTS: reply(200, "User-agent: *\nDisallow: /search/\n"),
            PAGE1: page("classic_page1.html"),
            PAGE2: page("classic_page2.html"),
            PAGE3: page("classic_page3.html"),
            **(routes or {}),
        }
        self.requests: list[tuple[float, str]] = []
        self.user_agents: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.requests.append((self.clock(), url))
        self.user_agents.add(request.headers["user-agent"])
        route = self.routes.get(url, reply(404))
        if isinstance(route, list):
            route = route.pop(0) if len(route) > 1 else route[0]
        if isinstance(route, Exception):
            raise route
        return route(request)

    def urls(self) -> list[str]:
        return [url for _, url in self.requests]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def site(clock) -> FakeSite:
    return FakeSite(clock)


def scraper_for(site: FakeSite, tmp_path, **kwargs) -> ImdbReviewScraper:
    client = httpx.Client(transport=httpx.MockTransport(site))
    return ImdbReviewScraper(tmp_path / "cache", client=client, clock=site.clock, sleep=site.clock.sleep, **kwargs)


# ---------------------------------------------------------------- parsing


def test_the_classic_first_page_parses_exactly():
    parsed = parse_reviews_page((PAGES / "classic_page1.html").read_text(), PAGE1)
    assert parsed.reviews == [REVIEW_1, REVIEW_2]
    assert parsed.next_key == "g4wp7cbkpq-page2"
    assert parsed.layout == "classic"


@pytest.mark.parametrize(
    "name,reviews,next_key",
    [
        ("classic_page2.html", [REVIEW_3], "g4wp7cbkpq-page3"),
        ("classic_page3.html", [REVIEW_4], None),  # the last page: div.load-more-data without a data-key
    ],
)
def test_ajax_pages_parse_exactly(name, reviews, next_key):
    parsed = parse_reviews_page((PAGES / name).read_text(), PAGE2)
    assert (parsed.reviews, parsed.next_key) == (reviews, next_key)


def test_the_2024_layout_parses_exactly():
    parsed = parse_reviews_page((PAGES / "modern_page.html").read_text(), PAGE1)
    assert parsed.reviews == [
        Review(
            review_id="rw7000001",
            rating=9,
            helpful_yes=1200,
            helpful_total=1227,
            title="Still great",
            text="Rewatched it.\nHolds up & more.",
            author="new_fan",
            date="Jun 1, 2024",
        ),
        Review(
            review_id="rw7000002",
            rating=None,
            helpful_yes=None,
            helpful_total=None,
            title="Unrated",
            text="No stars.",
            author="someone",
            date="Jul 2, 2024",
        ),
    ]
    assert (parsed.next_key, parsed.layout) == (None, "2024")


def test_a_page_without_reviews_is_an_empty_list(site, tmp_path):
    site.routes[PAGE1] = page("classic_no_reviews.html")
    assert parse_reviews_page((PAGES / "classic_no_reviews.html").read_text(), PAGE1).reviews == []
    result = scraper_for(site, tmp_path).scrape_movie(MOVIE)
    assert result == MovieReviews(MOVIE, reviews=[], pages_fetched=1, truncated=False, error=None)


def test_a_malformed_page_raises_naming_the_url():
    expected = f"^{re.escape(PAGE1)}: expected IMDb user reviews .* or a '0 Reviews' marker, found neither"
    with pytest.raises(PageParseError, match=expected):
        parse_reviews_page((PAGES / "malformed.html").read_text(), PAGE1)


@pytest.mark.parametrize(
    "html,problem",
    [
        (
            '<div class="lister-item"><div class="review-container"><div class="text">x</div></div></div>',
            r"review 1 \(no id\): expected a data-review-id attribute",
        ),
        (
            '<div class="lister-item" data-review-id="rw9"><div class="review-container">'
            '<a class="title">t</a></div></div>',
            r"review 1 \(rw9\): expected the review text in div.text",
        ),
        (
            '<div class="lister-item" data-review-id="rw9"><div class="review-container"><span '
            'class="rating-other-user-rating"><span>11</span></span><div class="text">x</div></div></div>',
            r"review 1 \(rw9\): expected a rating from 1 to 10, got '11'",
        ),
        (
            '<article class="user-review-item"><div class="ipc-html-content-inner-div">x</div></article>',
            r"review 1 \(no id\): expected a link to /review/rw<digits>/",
        ),
    ],
)
def test_a_broken_review_raises_naming_url_review_and_field(html, problem):
    with pytest.raises(PageParseError, match=f"^{re.escape(PAGE1)}: {problem}"):
        parse_reviews_page(html, PAGE1)


def test_a_malformed_page_is_recorded_or_raised_and_never_cached(site, tmp_path):
    site.routes[PAGE2] = page("malformed.html")
    scraper = scraper_for(site, tmp_path)
    result = scraper.scrape_movie(MOVIE)
    assert result.reviews == [REVIEW_1, REVIEW_2]  # what was read before the bad page is kept
    assert result.pages_fetched == 1
    assert result.error.startswith(f"{PAGE2}: expected IMDb user reviews")
    assert scraper.cache_path(PAGE1).is_file() and not scraper.cache_path(PAGE2).exists()
    assert scraper.stats.movies_failed == 1
    with pytest.raises(ScrapeError, match=f"^{re.escape(PAGE2)}: expected IMDb user reviews"):
        scraper_for(site, tmp_path, on_error="error").scrape_movie(MOVIE)


def test_an_invalid_imdb_id_is_refused_before_any_request(site, tmp_path):
    with pytest.raises(ValueError, match="'0109127' is not an IMDb title id"):
        scraper_for(site, tmp_path).scrape_movie("0109127")
    assert site.requests == []


# ---------------------------------------------------------------- pagination and cache


def test_pagination_follows_the_keys_to_the_last_page(site, tmp_path):
    scraper = scraper_for(site, tmp_path)
    result = scraper.scrape_movie(MOVIE)
    assert result == MovieReviews(MOVIE, [REVIEW_1, REVIEW_2, REVIEW_3, REVIEW_4], pages_fetched=3)
    assert site.urls() == [ROBOTS, PAGE1, PAGE2, PAGE3]
    assert site.user_agents == {USER_AGENT}
    assert scraper.stats.as_dict() == {
        "requests": 4,
        "pages_downloaded": 3,
        "cache_hits": 0,
        "retries": 0,
        "refusals": 0,
        "robots_fetches": 1,
        "movies": 1,
        "movies_failed": 0,
        "reviews": 4,
        "slept_seconds": 3.0,
    }  # the rate limit, 1 s per request


def test_the_page_cap_stops_pagination(site, tmp_path):
    result = scraper_for(site, tmp_path, max_pages=2).scrape_movie(MOVIE)
    assert result == MovieReviews(MOVIE, [REVIEW_1, REVIEW_2, REVIEW_3], pages_fetched=2, truncated=True)
    assert PAGE3 not in site.urls()


def test_a_second_scrape_reads_the_cache_without_any_request(site, tmp_path):
    first = scraper_for(site, tmp_path).scrape_movie(MOVIE)
    site.requests.clear()
    again = scraper_for(site, tmp_path)
    assert again.scrape_movie(MOVIE) == first
    assert site.requests == []
    assert (again.stats.requests, again.stats.cache_hits) == (0, 3)
    assert not list((tmp_path / "cache").rglob("*.part"))  # atomic writes leave no temporary files


def test_an_interrupted_scrape_resumes_where_it_stopped(clock, tmp_path):
    broken = FakeSite(clock, {PAGE2: reply(503)})
    result = scraper_for(broken, tmp_path, max_retries=0).scrape_movie(MOVIE)
    assert result.reviews == [REVIEW_1, REVIEW_2]
    assert result.error == f"{PAGE2}: gave up after 1 attempts; the last failed with HTTP 503"

    healthy = FakeSite(clock)
    resumed = scraper_for(healthy, tmp_path).scrape_movie(MOVIE)
    assert resumed == MovieReviews(MOVIE, [REVIEW_1, REVIEW_2, REVIEW_3, REVIEW_4], pages_fetched=3)
    assert healthy.urls() == [ROBOTS, PAGE2, PAGE3]


def test_fetch_caches_under_the_url(site, tmp_path):
    scraper = scraper_for(site, tmp_path)
    html = scraper.fetch(PAGE1)
    assert scraper.cache_path(PAGE1).read_text() == html == (PAGES / "classic_page1.html").read_text()
    assert scraper.fetch(PAGE1) == html
    assert site.urls() == [ROBOTS, PAGE1]


def test_scrape_yields_each_movie_and_reads_robots_once(site, tmp_path):
    other = "tt0000001"
    site.routes[f"https://www.imdb.com/title/{other}/reviews/"] = page("classic_no_reviews.html")
    scraper = scraper_for(site, tmp_path)
    results = list(scraper.scrape([MOVIE, other]))
    assert [(r.imdb_id, len(r.reviews), r.error) for r in results] == [(MOVIE, 4, None), (other, 0, None)]
    assert site.urls().count(ROBOTS) == 1
    assert (scraper.stats.movies, scraper.stats.reviews) == (2, 4)


# ---------------------------------------------------------------- politeness


def request_gaps(site: FakeSite) -> list[float]:
    times = [t for t, _ in site.requests]
    return [later - earlier for earlier, later in zip(times, times[1:])]


def test_requests_are_at_least_a_second_apart(site, tmp_path):
    scraper_for(site, tmp_path).scrape_movie(MOVIE)
    assert len(site.requests) == 4
    assert min(request_gaps(site)) >= 1.0


def test_a_slower_rate_and_a_robots_crawl_delay_are_obeyed(clock, tmp_path):
    slow = FakeSite(clock)
    scraper_for(slow, tmp_path / "a", requests_per_second=0.5).scrape_movie(MOVIE)
    assert min(request_gaps(slow)) >= 2.0

    delayed = FakeSite(clock, {ROBOTS: reply(200, "User-agent: *\nCrawl-delay: 3\nDisallow: /search/\n")})
    scraper_for(delayed, tmp_path / "b").scrape_movie(MOVIE)
    assert min(request_gaps(delayed)[1:]) >= 3.0  # from the first request after robots.txt was read


def test_robots_disallow_refuses_without_fetching_the_page(site, tmp_path):
    site.routes[ROBOTS] = reply(200, "User-agent: *\nAllow: /\n\nUser-agent: c2crs-review-scraper\nDisallow: /title/\n")
    scraper = scraper_for(site, tmp_path)
    result = scraper.scrape_movie(MOVIE)
    assert result.reviews == []
    assert result.error == f"{PAGE1}: disallowed for 'c2crs-review-scraper' by {ROBOTS}; not fetched"
    assert site.urls() == [ROBOTS]
    assert scraper.stats.refusals == 1


@pytest.mark.parametrize(
    "robots,allowed",
    [
        ([reply(404)], True),
        ([reply(403)], False),
        ([reply(503)], False),
        ([httpx.ConnectError("connection refused")], False),
        ([reply(302, location="https://evil.example.com/robots.txt")], False),
    ],
)
def test_robots_failures_allow_on_404_and_disallow_otherwise(site, tmp_path, robots, allowed):
    site.routes[ROBOTS] = robots
    scraper = scraper_for(site, tmp_path, max_retries=1)
    result = scraper.scrape_movie(MOVIE)
    assert (result.error is None) is allowed
    assert (PAGE1 in site.urls()) is allowed
    assert "https://evil.example.com/robots.txt" not in site.urls()


def test_the_host_of_the_first_url_must_be_allowed(site, tmp_path):
    scraper = scraper_for(site, tmp_path, base_url="https://evil.example.com")
    result = scraper.scrape_movie(MOVIE)
    assert result.error == (
        f"https://evil.example.com/title/{MOVIE}/reviews/: host 'evil.example.com' is not one "
        "of the allowed hosts (m.imdb.com, www.imdb.com); not fetched"
    )
    assert site.requests == []
    with pytest.raises(RefusedError, match="host '127.0.0.1' is not one of the allowed hosts"):
        scraper.fetch("http://127.0.0.1/admin")
    assert site.requests == []
    assert scraper.stats.refusals == 2


def test_a_redirect_off_the_allow_list_is_refused(site, tmp_path):
    site.routes[PAGE1] = reply(301, location="https://evil.example.com/title/tt0109127/reviews/")
    scraper = scraper_for(site, tmp_path)
    result = scraper.scrape_movie(MOVIE)
    assert result.error == (
        f"https://evil.example.com/title/{MOVIE}/reviews/ (redirected from {PAGE1}): refused, host "
        "'evil.example.com' (allowed: m.imdb.com, www.imdb.com); not fetched"
    )
    assert site.urls() == [ROBOTS, PAGE1]
    assert scraper.stats.refusals == 1


@pytest.mark.parametrize(
    "location, refused",
    [
        ("https://m.imdb.com:8443/title/tt0109127/reviews/", "refused, port 8443"),
        ("https://www.imdb.com:8443/title/tt0109127/reviews/", "refused, port 8443 (the request's: default)"),
        ("http://www.imdb.com/title/tt0109127/reviews/", "refused, a downgrade from https to http"),
    ],
)
def test_a_redirect_to_another_port_or_down_to_http_is_refused(site, tmp_path, location, refused):
    site.routes[PAGE1] = reply(301, location=location)
    scraper = scraper_for(site, tmp_path)
    result = scraper.scrape_movie(MOVIE)
    assert result.error == f"{location} (redirected from {PAGE1}): {refused}; not fetched"
    assert site.urls() == [ROBOTS, PAGE1] and scraper.stats.refusals == 1


def test_a_mirror_on_its_own_port_follows_its_own_redirects_and_no_other_port(site, tmp_path):
    """A local mirror (base_url on port 8080) that redirects within itself is followed; to port 8081 it is not."""
    base = "http://mirror.local:8080"
    first, moved = f"{base}/title/{MOVIE}/reviews/", f"{base}/moved/{MOVIE}/reviews/"
    site.routes.update(
        {
            f"{base}/robots.txt": reply(404),
            first: reply(302, location=f"/moved/{MOVIE}/reviews/"),
            moved: page("classic_page3.html"),
        }
    )
    scraper = scraper_for(site, tmp_path, base_url=base, allowed_hosts=["mirror.local"])
    assert scraper.scrape_movie(MOVIE).reviews == [REVIEW_4]
    site.routes[first] = reply(302, location=f"http://mirror.local:8081/moved/{MOVIE}/reviews/")
    fresh = scraper_for(site, tmp_path / "again", base_url=base, allowed_hosts=["mirror.local"])
    assert fresh.scrape_movie(MOVIE).error == (
        f"http://mirror.local:8081/moved/{MOVIE}/reviews/ (redirected from {first}): refused, port 8081 (the "
        "request's: 8080); not fetched"
    )


def test_a_redirect_within_the_allow_list_is_followed_and_cached_under_the_first_url(site, tmp_path):
    mobile = f"https://m.imdb.com/title/{MOVIE}/reviews/"
    site.routes.update(
        {
            PAGE1: reply(302, location=mobile),
            mobile: page("classic_page3.html"),
            "https://m.imdb.com/robots.txt": reply(404),
        }
    )
    scraper = scraper_for(site, tmp_path)
    result = scraper.scrape_movie(MOVIE)
    assert result.reviews == [REVIEW_4] and result.error is None
    assert site.urls() == [ROBOTS, PAGE1, "https://m.imdb.com/robots.txt", mobile]
    assert scraper.cache_path(PAGE1).is_file()


def test_redirects_are_capped(site, tmp_path):
    site.routes[PAGE1] = reply(302, location="/title/tt0109127/reviews/?loop=1")
    site.routes[PAGE1 + "?loop=1"] = reply(302, location="/title/tt0109127/reviews/")
    result = scraper_for(site, tmp_path, max_redirects=5).scrape_movie(MOVIE)
    assert result.error.startswith(f"{PAGE1}: more than 5 redirects")
    assert len(site.requests) == 1 + 6


# ---------------------------------------------------------------- retries


def test_429_is_retried_after_the_retry_after_seconds(site, tmp_path):
    site.routes[PAGE1] = [reply(429, retry_after="7"), page("classic_page3.html")]
    scraper = scraper_for(site, tmp_path)
    result = scraper.scrape_movie(MOVIE)
    assert result.reviews == [REVIEW_4] and result.error is None
    assert site.urls() == [ROBOTS, PAGE1, PAGE1]
    assert request_gaps(site)[1] == 7.0
    assert scraper.stats.retries == 1


def test_retry_after_is_capped(site, tmp_path):
    site.routes[PAGE1] = [reply(503, retry_after="86400"), page("classic_page3.html")]
    scraper_for(site, tmp_path, retry_after_max=30).scrape_movie(MOVIE)
    assert request_gaps(site)[1] == 30.0


def test_5xx_is_retried_with_exponential_backoff(site, tmp_path):
    site.routes[PAGE1] = [reply(500), reply(502), page("classic_page3.html")]
    scraper = scraper_for(site, tmp_path, backoff_base=2.0)
    result = scraper.scrape_movie(MOVIE)
    assert result.reviews == [REVIEW_4] and result.error is None
    assert request_gaps(site)[1:] == [2.0, 4.0]
    assert scraper.stats.retries == 2


def test_a_timeout_is_retried(site, tmp_path):
    site.routes[PAGE1] = [httpx.ReadTimeout("read timed out"), page("classic_page3.html")]
    scraper = scraper_for(site, tmp_path)
    result = scraper.scrape_movie(MOVIE)
    assert result.reviews == [REVIEW_4] and result.error is None
    assert site.urls() == [ROBOTS, PAGE1, PAGE1]
    assert scraper.stats.retries == 1


def test_exhausted_retries_are_recorded(site, tmp_path):
    site.routes[PAGE1] = [reply(503)]
    scraper = scraper_for(site, tmp_path, max_retries=2)
    result = scraper.scrape_movie(MOVIE)
    assert result.error == f"{PAGE1}: gave up after 3 attempts; the last failed with HTTP 503"
    assert site.urls() == [ROBOTS, PAGE1, PAGE1, PAGE1]
    assert (scraper.stats.retries, scraper.stats.movies_failed) == (2, 1)
    assert not scraper.cache_path(PAGE1).exists()


def test_exhausted_timeouts_name_the_exception(site, tmp_path):
    site.routes[PAGE1] = [httpx.ReadTimeout("read timed out")]
    result = scraper_for(site, tmp_path, max_retries=1).scrape_movie(MOVIE)
    assert result.error == f"{PAGE1}: gave up after 2 attempts; the last failed with ReadTimeout (read timed out)"


def test_404_is_not_retried(site, tmp_path):
    site.routes[PAGE1] = [reply(404)]
    scraper = scraper_for(site, tmp_path)
    result = scraper.scrape_movie(MOVIE)
    assert result.error == f"{PAGE1}: HTTP 404 from {PAGE1} (not retried)"
    assert site.urls() == [ROBOTS, PAGE1]
    assert scraper.stats.retries == 0


@pytest.mark.parametrize(
    "kwargs,problem",
    [
        ({"requests_per_second": 0}, "requests_per_second must be greater than 0, got 0"),
        ({"max_pages": 0}, "max_pages must be greater than 0, got 0"),
        ({"max_retries": -1}, "max_retries must be 0 or more, got -1"),
        ({"on_error": "ignore"}, "on_error must be 'skip' or 'error', got 'ignore'"),
    ],
)
def test_bad_settings_are_refused(tmp_path, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        ImdbReviewScraper(tmp_path, client=httpx.Client(transport=httpx.MockTransport(reply(200))), **kwargs)
