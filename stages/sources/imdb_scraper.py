"""IMDb user reviews for the `reviews` stage: a polite, resumable scraper and a parser of IMDb's review pages.

Over 400 lines because the politeness rules (robots, rate limit, allowed hosts per hop, retries, cache) and the page
parser are one contract with the stage; splitting them would scatter it.

A plain library (no Prefect, no MLflow, no params): the stage passes every setting to `ImdbReviewScraper`.

Politeness: at most one request per second by default (slower if robots.txt asks for a Crawl-delay), a User-Agent
that names the project, robots.txt obeyed, only allow-listed hosts contacted (each redirect hop is checked, at most
5 hops), a cap on pages per movie, and every page fetched once: a page that parses is cached on disk under its URL,
so a restarted scrape goes on where it stopped and parsing again costs no request. A page that does not parse is not
cached (it is often a block or error page; the next run tries again).

robots.txt is fetched once per host and scraper object, only when a page has to be downloaded (not cached on disk, so
each run obeys the current rules). A 404 (any 4xx but 401/403) means everything is allowed, as RFC 9309 says. A
401/403, a 5xx or timeout after the retries, or a redirect off the allow-list means nothing is allowed: we cannot
know the rules, so we do not crawl (the conservative reading; RFC 9309 says the same for 5xx).

Transient failures (429, 5xx, timeouts and other transport errors) are retried with exponential backoff; a numeric
Retry-After header is honoured (capped). Other 4xx are not retried.

Layouts: IMDb's classic review pages (div.lister-item[data-review-id] > div.review-container, paginated through
/title/<id>/reviews/_ajax?paginationKey=<div.load-more-data data-key>) and the 2024 layout (article.user-review-item),
of which only the first page is read: its "more" button calls a GraphQL API, not a page. Both are parsed from the
English site (the scraper asks for en-US): the "found this helpful" and "0 Reviews" markers are English text.
"""

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote
from urllib.robotparser import RobotFileParser

import httpx
from selectolax.lexbor import LexborHTMLParser, LexborNode

from stages.io.progress import progress
from stages.sources.fetch import redirect_problem

log = logging.getLogger(__name__)

USER_AGENT = "c2crs-review-scraper/0.1 (research; +https://github.com/)"
ALLOWED_HOSTS = frozenset({"www.imdb.com", "m.imdb.com"})
BASE_URL = "https://www.imdb.com"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

IMDB_ID = re.compile(r"^tt\d{7,8}$")
# These run on the text or an attribute of a parsed element, never on HTML.
HELPFUL = re.compile(r"([\d,]+)\s+out\s+of\s+([\d,]+)\s+found\s+this\s+helpful", re.IGNORECASE)
NO_REVIEWS = re.compile(r"^(0|no)\s+(user\s+)?reviews?\b", re.IGNORECASE)
REVIEW_ID = re.compile(r"\b(rw\d+)\b")
COUNT = re.compile(r"^(\d+(?:\.\d+)?)([KM]?)$", re.IGNORECASE)
BREAK = "\ue000"  # stands for <br> while the text of a review is flattened (a private-use character)


class ScrapeError(Exception):
    """A page that could not be had or read; the message names the URL and the problem."""


class RefusedError(ScrapeError):
    """A URL we do not fetch: its host is not allow-listed, or robots.txt disallows it."""


class FetchError(ScrapeError):
    """An HTTP failure: a 4xx, or a 429/5xx/transport error that outlasted the retries."""


class PageParseError(ScrapeError):
    """A page that is not an IMDb review page as we know it (or IMDb changed its layout)."""


@dataclass(frozen=True)
class Review:
    review_id: str  # "rw1234567"
    rating: int | None  # 1-10; None when the reviewer gave none
    helpful_yes: int | None  # "123 out of 150 found this helpful" -> 123, 150
    helpful_total: int | None
    title: str | None
    text: str  # whitespace normalised; each <br> run becomes one newline
    author: str | None = None
    date: str | None = None  # as IMDb shows it, e.g. "12 March 2004"


@dataclass(frozen=True)
class ReviewPage:
    reviews: list[Review]
    next_key: str | None  # the classic layout's pagination key of the next page
    layout: str  # "classic", "2024" or "empty"


@dataclass
class MovieReviews:
    imdb_id: str
    reviews: list[Review] = field(default_factory=list)
    pages_fetched: int = 0  # pages read, from the cache or the network
    truncated: bool = False  # stopped by the page cap while IMDb had more
    error: str | None = None  # why the scrape of this movie stopped early (with on_error="skip")


@dataclass
class ScrapeStats:
    """Counters for the stage's metrics."""

    requests: int = 0  # HTTP requests sent, including robots.txt, redirect hops and retries
    pages_downloaded: int = 0
    cache_hits: int = 0
    retries: int = 0
    refusals: int = 0  # URLs not fetched: host not allow-listed or disallowed by robots.txt
    robots_fetches: int = 0
    movies: int = 0
    movies_failed: int = 0
    reviews: int = 0
    slept_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- parsing


def parse_reviews_page(html: str, url: str) -> ReviewPage:
    """The reviews of one page and the key of the next; PageParseError when the page is not a review page."""
    tree = LexborHTMLParser(html)
    classic = tree.css("div.review-container") or tree.css("div.lister-item[data-review-id]")
    if classic:
        reviews = [_classic_review(node, url, i) for i, node in enumerate(classic, start=1)]
        return ReviewPage(_unique(reviews), _next_key(tree), "classic")
    modern = tree.css("article.user-review-item") or tree.css('[data-testid="review-card-parent"]')
    if modern:
        reviews = [_modern_review(node, url, i) for i, node in enumerate(modern, start=1)]
        return ReviewPage(_unique(reviews), None, "2024")
    if _says_no_reviews(tree):
        return ReviewPage([], None, "empty")
    raise PageParseError(
        f"{url}: expected IMDb user reviews (div.review-container in div.lister-item[data-review-id], or "
        "article.user-review-item) or a '0 Reviews' marker, found neither: not an IMDb review page (a block or "
        "error page?), or IMDb changed its layout"
    )


def _classic_review(node: LexborNode, url: str, index: int) -> Review:
    review_id = _review_id_attribute(node)
    where = f"{url}: review {index} ({review_id or 'no id'})"
    if review_id is None:
        raise PageParseError(f"{where}: expected a data-review-id attribute on the review or its div.lister-item")
    text_node = node.css_first("div.text")
    if text_node is None:
        raise PageParseError(f"{where}: expected the review text in div.text.show-more__control")
    helpful_yes = helpful_total = None
    actions = node.css_first("div.actions")
    if actions is not None and (match := HELPFUL.search(_clean(actions.text()))):
        helpful_yes, helpful_total = (int(n.replace(",", "")) for n in match.groups())
    rating_node = node.css_first("span.rating-other-user-rating > span")
    return Review(
        review_id=review_id,
        rating=_rating(rating_node, where),
        helpful_yes=helpful_yes,
        helpful_total=helpful_total,
        title=_text_of(node.css_first("a.title")),
        text=_review_text(text_node),
        author=_text_of(node.css_first("span.display-name-link")),
        date=_text_of(node.css_first("span.review-date")),
    )


def _modern_review(node: LexborNode, url: str, index: int) -> Review:
    review_id = _review_id_attribute(node)
    if review_id is None:
        for link in node.css("a[href]"):
            if "/review/" in link.attributes["href"] and (match := REVIEW_ID.search(link.attributes["href"])):
                review_id = match[1]
                break
    where = f"{url}: review {index} ({review_id or 'no id'})"
    if review_id is None:
        raise PageParseError(f"{where}: expected a link to /review/rw<digits>/ in article.user-review-item")
    text_node = node.css_first("div.ipc-html-content-inner-div")
    if text_node is None:
        raise PageParseError(f"{where}: expected the review text in div.ipc-html-content-inner-div")
    up = _count(node.css_first("span.ipc-voting__label__count--up"), where)
    down = _count(node.css_first("span.ipc-voting__label__count--down"), where)
    helpful_yes, helpful_total = (up, up + down) if up is not None and down is not None else (None, None)
    return Review(
        review_id=review_id,
        rating=_rating(node.css_first("span.ipc-rating-star--rating"), where),
        helpful_yes=helpful_yes,
        helpful_total=helpful_total,
        title=_text_of(node.css_first("h3.ipc-title__text")),
        text=_review_text(text_node),
        author=_text_of(node.css_first('[data-testid="author-link"]')),
        date=_text_of(node.css_first("li.review-date")),
    )


def _review_id_attribute(node: LexborNode) -> str | None:
    """data-review-id on the node or an ancestor (IMDb puts it on div.lister-item, around div.review-container)."""
    while node is not None and node.tag not in ("body", "html"):
        value = (node.attributes.get("data-review-id") or "").strip()
        if value:
            return value
        node = node.parent
    return None


def _rating(node: LexborNode | None, where: str) -> int | None:
    if node is None:
        return None
    text = _clean(node.text())
    if not text.isdigit() or not 1 <= int(text) <= 10:
        raise PageParseError(f"{where}: expected a rating from 1 to 10, got {text!r}")
    return int(text)


def _count(node: LexborNode | None, where: str) -> int | None:
    """A vote count of the 2024 layout: "27", "1.2K" (shown rounded, so large counts are approximate)."""
    if node is None:
        return None
    text = _clean(node.text()).replace(",", "")
    match = COUNT.match(text)
    if match is None:
        raise PageParseError(f"{where}: expected a vote count, got {text!r}")
    return round(float(match[1]) * {"": 1, "K": 1_000, "M": 1_000_000}[match[2].upper()])


def _next_key(tree: LexborHTMLParser) -> str | None:
    node = tree.css_first("div.load-more-data[data-key]")
    key = (node.attributes.get("data-key") or "").strip() if node is not None else ""
    return key or None


def _says_no_reviews(tree: LexborHTMLParser) -> bool:
    """IMDb's header of a title without reviews: "0 Reviews" (classic) or "0 reviews" (2024)."""
    for node in tree.css('div.header span, [data-testid="tturv-total-reviews"]'):
        if NO_REVIEWS.match(_clean(node.text())):
            return True
    return False


def _review_text(node: LexborNode) -> str:
    """Text with runs of whitespace collapsed; <br> (one or several) becomes a newline."""
    for br in node.css("br"):
        br.replace_with(BREAK)
    pieces = (_clean(piece) for piece in node.text(deep=True, separator="").split(BREAK))
    return "\n".join(piece for piece in pieces if piece)


def _text_of(node: LexborNode | None) -> str | None:
    return (_clean(node.text()) or None) if node is not None else None


def _clean(text: str) -> str:
    return " ".join(text.split())


def _unique(reviews: list[Review]) -> list[Review]:
    """The first of each review id, should a page list one twice."""
    seen: dict[str, Review] = {}
    for review in reviews:
        seen.setdefault(review.review_id, review)
    return list(seen.values())


# ---------------------------------------------------------------- fetching


class ImdbReviewScraper:
    """Fetches and parses the user reviews of IMDb titles; see the module docstring for the politeness rules.

    `clock` and `sleep` are injectable so tests need not wait. With on_error="skip" a movie whose pages cannot be
    had or read comes back with the reviews read so far and `error` set; with "error" the ScrapeError is raised.
    """

    def __init__(
        self,
        cache_dir: Path | str,
        *,
        client: httpx.Client | None = None,
        user_agent: str = USER_AGENT,
        requests_per_second: float = 1.0,
        max_retries: int = 4,
        backoff_base: float = 2.0,
        backoff_max: float = 60.0,
        retry_after_max: float = 300.0,
        max_pages: int = 10,
        allowed_hosts: Iterable[str] = ALLOWED_HOSTS,
        max_redirects: int = 5,
        timeout: float = 30.0,
        base_url: str = BASE_URL,
        on_error: str = "skip",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        for name, value, low in (
            ("requests_per_second", requests_per_second, 0),
            ("max_pages", max_pages, 0),
            ("timeout", timeout, 0),
        ):
            if not value > low:
                raise ValueError(f"{name} must be greater than {low}, got {value!r}")
        for name, value in (
            ("max_retries", max_retries),
            ("max_redirects", max_redirects),
            ("backoff_base", backoff_base),
            ("backoff_max", backoff_max),
            ("retry_after_max", retry_after_max),
        ):
            if value < 0:
                raise ValueError(f"{name} must be 0 or more, got {value!r}")
        if on_error not in ("skip", "error"):
            raise ValueError(f"on_error must be 'skip' or 'error', got {on_error!r}")
        self.cache_dir = Path(cache_dir)
        self.user_agent = user_agent
        self.min_interval = 1.0 / requests_per_second
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        self.max_pages = max_pages
        self.allowed_hosts = frozenset(host.lower() for host in allowed_hosts)
        self.max_redirects = max_redirects
        self.base_url = base_url.rstrip("/")
        self.on_error = on_error
        self.clock = clock
        self.sleep = sleep
        self.stats = ScrapeStats()
        self._own_client = client is None
        self.client = client or httpx.Client(timeout=timeout)
        self._headers = {"User-Agent": user_agent, "Accept-Language": "en-US,en;q=0.5"}
        self._robots: dict[str, RobotFileParser] = {}
        self._last_request: float | None = None

    def __enter__(self) -> "ImdbReviewScraper":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Closes the HTTP client if the scraper made it (an injected client is the caller's to close)."""
        if self._own_client:
            self.client.close()

    # ------------------------------------------------------------ movies

    def scrape(self, imdb_ids: Iterable[str]) -> Iterator[MovieReviews]:
        """scrape_movie for each id, in order, with a progress bar."""
        with progress(imdb_ids, desc="IMDb reviews", unit=" movie") as bar:
            for imdb_id in bar:
                result = self.scrape_movie(imdb_id)
                bar.set_postfix(
                    requests=self.stats.requests,
                    cached=self.stats.cache_hits,
                    failed=self.stats.movies_failed,
                    refresh=False,
                )
                yield result

    def scrape_movie(self, imdb_id: str) -> MovieReviews:
        """All review pages of one title, following the pagination keys up to max_pages."""
        if not IMDB_ID.match(imdb_id):
            raise ValueError(f"{imdb_id!r} is not an IMDb title id (expected 'tt' and 7 or 8 digits)")
        result = MovieReviews(imdb_id)
        seen: set[str] = set()
        key = None
        try:
            while True:
                if result.pages_fetched >= self.max_pages:
                    result.truncated = True
                    break
                page = self._page(self.reviews_url(imdb_id, key))
                result.pages_fetched += 1
                for review in page.reviews:
                    if review.review_id not in seen:
                        seen.add(review.review_id)
                        result.reviews.append(review)
                key = page.next_key
                if key is None:
                    break
        except ScrapeError as exc:
            if self.on_error == "error":
                raise
            result.error = str(exc)
            self.stats.movies_failed += 1
            log.warning("%s: %s (kept %d reviews of %d pages)", imdb_id, exc, len(result.reviews), result.pages_fetched)
        self.stats.movies += 1
        self.stats.reviews += len(result.reviews)
        return result

    def reviews_url(self, imdb_id: str, pagination_key: str | None = None) -> str:
        url = f"{self.base_url}/title/{imdb_id}/reviews/"
        return url if pagination_key is None else f"{url}_ajax?paginationKey={quote(pagination_key, safe='')}"

    def _page(self, url: str) -> ReviewPage:
        """A parsed review page; downloaded pages are cached only once they parse."""
        cached = self.cache_path(url)
        if cached.is_file():
            self.stats.cache_hits += 1
            try:
                return parse_reviews_page(cached.read_text(encoding="utf-8"), url)
            except PageParseError as exc:
                raise PageParseError(f"{exc} [cached copy: {cached}; delete it to fetch the page again]") from None
        html = self._download(url)
        page = parse_reviews_page(html, url)
        _write_atomically(cached, html)
        return page

    # ------------------------------------------------------------ pages

    def fetch(self, url: str) -> str:
        """The page at url: from the cache, else downloaded and cached."""
        cached = self.cache_path(url)
        if cached.is_file():
            self.stats.cache_hits += 1
            return cached.read_text(encoding="utf-8")
        html = self._download(url)
        _write_atomically(cached, html)
        return html

    def cache_path(self, url: str) -> Path:
        """Where the page of url is cached: the key is the URL itself (its SHA-256 names the file)."""
        return self.cache_dir / "pages" / f"{hashlib.sha256(url.encode('utf-8')).hexdigest()}.html"

    def _download(self, url: str) -> str:
        response = self._get(url, check_robots=True)
        if not response.is_success:
            raise FetchError(f"{url}: HTTP {response.status_code} from {response.url} (not retried)")
        self.stats.pages_downloaded += 1
        return response.text

    def _get(self, url: str, check_robots: bool) -> httpx.Response:
        """GET url following redirects by hand, so each hop's host and robots.txt are checked."""
        target = httpx.URL(url)
        for _ in range(self.max_redirects + 1):
            self._check_allowed(target, url, check_robots)
            response = self._send(target)
            if response.status_code not in REDIRECT_STATUSES:
                return response
            location = response.headers.get("location")
            if not location:
                raise FetchError(f"{url}: HTTP {response.status_code} from {target} without a Location header")
            log.info("%s redirects to %s", target, location)
            target = target.join(location)
        raise FetchError(f"{url}: more than {self.max_redirects} redirects (the last to {target})")

    def _check_allowed(self, target: httpx.URL, start: str, check_robots: bool) -> None:
        """The first URL's host must be allowed; a redirect follows fetch.redirect_problem's rule (the same
        origin, or another allowed host on its default port; never down to http)."""
        via = "" if str(target) == start else f" (redirected from {start})"
        first = httpx.URL(start)
        if first.scheme not in ("http", "https") or first.host.lower() not in self.allowed_hosts:
            self.stats.refusals += 1
            raise RefusedError(
                f"{first}: host {first.host!r} is not one of the allowed hosts "
                f"({', '.join(sorted(self.allowed_hosts))}); not fetched"
            )
        problem = None if target == first else redirect_problem(target, first, self.allowed_hosts)
        if problem:
            self.stats.refusals += 1
            raise RefusedError(f"{target}{via}: refused, {problem}; not fetched")
        if check_robots and not self._robots_for(target).can_fetch(self.user_agent, str(target)):
            self.stats.refusals += 1
            raise RefusedError(
                f"{target}{via}: disallowed for {self.user_agent.split('/')[0]!r} by "
                f"{self._robots_url(target)}; not fetched"
            )

    # ------------------------------------------------------------ robots.txt

    def _robots_url(self, target: httpx.URL) -> str:
        return str(target.copy_with(path="/robots.txt", query=None, fragment=None))

    def _robots_for(self, target: httpx.URL) -> RobotFileParser:
        """The robots.txt rules of target's host, fetched once (see the module docstring for failures)."""
        url = self._robots_url(target)
        if url in self._robots:
            return self._robots[url]
        parser = RobotFileParser(url)
        self.stats.robots_fetches += 1
        try:
            response = self._get(url, check_robots=False)
        except ScrapeError as exc:
            log.warning("%s unavailable (%s): every URL of %s counts as disallowed", url, exc, target.host)
            parser.disallow_all = True
        else:
            status = response.status_code
            if response.is_success:
                parser.parse(response.text.splitlines())
                delay = parser.crawl_delay(self.user_agent)
                if delay is not None and float(delay) > self.min_interval:
                    log.info("%s asks for a crawl delay of %s s", url, delay)
                    self.min_interval = float(delay)
            elif status in (401, 403) or status >= 500:
                log.warning("%s: HTTP %d, every URL of %s counts as disallowed", url, status, target.host)
                parser.disallow_all = True
            else:
                parser.allow_all = True
        self._robots[url] = parser
        return parser

    # ------------------------------------------------------------ requests

    def _send(self, url: httpx.URL) -> httpx.Response:
        """One GET, rate limited, retried on 429, 5xx and transport errors; FetchError once retries run out."""
        for attempt in range(self.max_retries + 1):
            self._wait_turn()
            self.stats.requests += 1
            retry_after = None
            try:
                response = self.client.get(url, headers=self._headers, follow_redirects=False)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__} ({exc})" if str(exc) else type(exc).__name__
            else:
                if response.status_code != 429 and response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}"
                retry_after = _retry_after_seconds(response)
            if attempt == self.max_retries:
                raise FetchError(f"{url}: gave up after {attempt + 1} attempts; the last failed with {problem}")
            if retry_after is not None:
                delay = min(retry_after, self.retry_after_max)
            else:
                delay = min(self.backoff_max, self.backoff_base * 2**attempt)
            self.stats.retries += 1
            log.warning("%s: %s, retrying in %.1f s (%d of %d)", url, problem, delay, attempt + 1, self.max_retries)
            self._pause(delay)
        raise AssertionError("unreachable")

    def _wait_turn(self) -> None:
        """Sleeps until min_interval has passed since the previous request started."""
        if self._last_request is not None:
            wait = self._last_request + self.min_interval - self.clock()
            if wait > 0:
                self._pause(wait)
        self._last_request = self.clock()

    def _pause(self, seconds: float) -> None:
        self.stats.slept_seconds += seconds
        self.sleep(seconds)


def _retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After in seconds; an HTTP-date (rare) is ignored in favour of the exponential backoff."""
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside path, then rename: a killed scrape never leaves half a page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
