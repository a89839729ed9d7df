"""The chat page in a real browser (headless Chromium through Selenium): type a message with an "@" movie from the
autocomplete, see the model's response and recommendation cards, open a card's explanation; pick a baseline
recommender and compare it with C2-CRS."""

import contextlib
import shutil
import threading
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements.txt has it)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as seen  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="Debian's chromium and chromium-driver are not installed "
    "(apt-get install chromium chromium-driver; .ci/run does this as root)",
)


@contextlib.contextmanager
def serving(models):
    """The page's address, served by pipeline serve's app on `models` in a thread."""
    import uvicorn

    from pipeline.serve import create_app
    from pipeline.servers import free_port

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(models, timeout=120), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def page_url(chat_models):
    with serving(chat_models) as url:
        yield url


@pytest.fixture
def every_model_page_url(served_models):
    with serving(served_models) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1280,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def test_a_conversation_in_the_page_shows_a_response_cards_and_their_why(page_url, browser):
    wait = WebDriverWait(browser, 60)
    browser.get(page_url)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#recommender option"))  # the model picker is filled
    text = browser.find_element(By.ID, "text")
    text.send_keys("I loved @Alp")
    suggestion = wait.until(seen.element_to_be_clickable((By.CSS_SELECTOR, '#suggestions li[data-movie="100"]')))
    assert suggestion.text == "Alpha (2001)"
    suggestion.click()
    assert text.get_attribute("value") == "I loved @Alpha (2001) "
    text.send_keys("with Tom Hanks", Keys.ENTER)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.recommender")) == 2)
    cards = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#cards .card"))
    assert len(cards) == 3 and browser.find_element(By.ID, "error").text == ""
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.seeker")[0].text == "I loved @Alpha (2001) with Tom Hanks"
    # The page sent "@100": the model read Alpha as the movie, so it is not recommended back.
    assert "100" not in [card.get_attribute("data-movie") for card in cards]
    why = cards[0].find_element(By.CSS_SELECTOR, ".why")
    assert not why.is_displayed()
    cards[0].find_element(By.TAG_NAME, "button").click()
    assert why.is_displayed() and "what the recommender weighted" in why.text.lower() and "Alpha" in why.text


def test_a_baseline_picked_in_the_page_answers_with_its_cards_and_compares_with_c2crs(every_model_page_url, browser):
    wait = WebDriverWait(browser, 120)
    browser.get(every_model_page_url)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, '#recommender option[value="workspace:textcnn"]'))
    Select(browser.find_element(By.ID, "recommender")).select_by_value("workspace:textcnn")
    browser.find_element(By.ID, "text").send_keys("I loved @100 with Tom Hanks", Keys.ENTER)
    cards = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#cards .card"))
    assert len(cards) == 3 and browser.find_element(By.ID, "error").text == ""
    assert "100" not in [card.get_attribute("data-movie") for card in cards]
    cards[0].find_element(By.TAG_NAME, "button").click()
    why = cards[0].find_element(By.CSS_SELECTOR, ".why")
    assert "TextCNN reads only the words" in why.text and "weighted" not in why.text.lower()
    Select(browser.find_element(By.ID, "compare-with")).select_by_value("workspace")
    browser.find_element(By.ID, "compare").click()
    columns = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#comparison .column"))
    assert [c.get_attribute("data-recommender") for c in columns] == ["workspace:textcnn", "workspace"]
    assert [len(c.find_elements(By.TAG_NAME, "li")) for c in columns] == [4, 4]  # the fixture's movies but Alpha
    assert [li.get_attribute("data-movie") for li in columns[0].find_elements(By.TAG_NAME, "li")][:3] == [
        card.get_attribute("data-movie") for card in cards
    ]
