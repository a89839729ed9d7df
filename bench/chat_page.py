"""Benchmark: a conversation on the chat page in a real browser, against a running `python -m pipeline serve`: the
time from pressing Enter to the model's answer and cards on screen, per turn; and the README's screenshot.

Why: what a person at the page waits for, rendering included (bench/serve.py measures the API alone). Target: under
1 s per turn on 2 cores.

Needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium (requirements).

    .venv/bin/python -m pipeline serve &            # in a workspace with trained models
    .venv/bin/python bench/chat_page.py [--url http://127.0.0.1:8000/] [--screenshot docs/chat-page.png]

Prints the per-turn times and writes bench/results/chat_page.json.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for common, also when run with runpy
from common import ROOT, write_results  # noqa: E402  (puts the project root on sys.path)
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Each turn: the words typed, then a movie picked from the "@" autocomplete (the first hit for those letters).
TURNS = [
    ("Hi! I love sci-fi like @The Matr", "and anything with Keanu Reeves"),
    ("I have seen that one. Something funnier, maybe with Jim Carrey?", None),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/")
    parser.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "chat-page.png")
    args = parser.parse_args()
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        sys.exit("error: Debian's chromium and chromium-driver are needed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="c2crs-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,860",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    wait = WebDriverWait(browser, 120)
    seconds = []
    try:
        browser.get(args.url)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#recommender option"))
        for typed, after_pick in TURNS:
            text = browser.find_element(By.ID, "text")
            text.send_keys(typed)
            if after_pick is not None:
                wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#suggestions li"))[0].click()
                text.send_keys(after_pick)
            answers = len(browser.find_elements(By.CSS_SELECTOR, ".msg.recommender"))
            began = time.perf_counter()
            text.send_keys(Keys.ENTER)
            wait.until(
                lambda b, answers=answers: (
                    len(b.find_elements(By.CSS_SELECTOR, ".msg.recommender")) > answers
                    or b.find_element(By.ID, "error").text
                )
            )
            seconds.append(round(time.perf_counter() - began, 3))
            error = browser.find_element(By.ID, "error").text
            if error:
                sys.exit(f"error: the page says: {error}")
            print(f"turn {len(seconds)}: answered in {seconds[-1]:.3f} s")
        browser.find_element(By.CSS_SELECTOR, "#cards .card button").click()
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(args.screenshot))
        print(f"screenshot: {args.screenshot}")
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
    write_results("chat_page", {"url": args.url, "seconds_per_turn": seconds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
