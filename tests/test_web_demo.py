"""scripts/web_demo.py in a real browser: the page streams the same greedy answers as TunedModel.generate.

Needs the demo extras (gradio, selenium) and Debian's chromium + chromium-driver: bash scripts/setup_demo.sh.
A screenshot of the conversation is saved to test-artifacts/web_demo.png (and to the test's tmp_path).
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, TOY_DEV

from glmtune.serve.tuned import load_tuned

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SETUP_HINT = "run `bash scripts/setup_demo.sh` (pip extras + Debian chromium/chromium-driver)"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1100",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(request, tmp_path, model_dir, checkpoint):
    port = _free_port()
    log = open(tmp_path / "web_demo.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "web_demo.py"),
            "--model_name_or_path",
            str(model_dir),
            "--checkpoint",
            str(checkpoint),
            "--port",
            str(port),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )

    def stop():
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()

    request.addfinalizer(stop)
    return f"http://127.0.0.1:{port}/", server


def _wait_for_page(url, server, log_path, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"web_demo.py exited with {server.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"web demo not serving {url} after {timeout} s:\n{log_path.read_text()}")


def _web_demo_module():
    spec = importlib.util.spec_from_file_location("web_demo", REPO / "scripts" / "web_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: {SETUP_HINT}")
    if importlib.util.find_spec("gradio") is None:
        pytest.fail(f"gradio is not installed: {SETUP_HINT}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {SETUP_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # explicit paths: no Selenium Manager


def test_web_demo_chats_with_streamed_greedy_answers_and_history(
    request, tmp_path, demo_model_dir, demo_ptuning_checkpoint
):
    driver = _browser()  # fails with the setup hint before starting anything when the extras are missing
    request.addfinalizer(driver.quit)
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, server = _start_server(request, tmp_path, demo_model_dir, demo_ptuning_checkpoint)
    # The expected greedy answers, computed while the server starts: round 2 sees round 1 as history.
    max_new_tokens = _web_demo_module().MAX_NEW_TOKENS  # the slider's default
    tuned = load_tuned(str(demo_model_dir), str(demo_ptuning_checkpoint))
    queries = [json.loads(line)["content"] for line in TOY_DEV.open()][:2]
    history, expected_answers = [], []
    for query in queries:
        expected_answers.append(tuned.generate([query], [history], max_new_tokens=max_new_tokens)[0])
        history = history + [[query, expected_answers[-1]]]
    assert all(expected_answers), "the tiny model gave an empty answer: nothing to compare"
    _wait_for_page(url, server, tmp_path / "web_demo.log")

    driver.get(url)
    wait = WebDriverWait(driver, 30)
    textbox = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#user_input textarea"))
    assert (
        float(driver.find_element(By.CSS_SELECTOR, "#max_new_tokens input[type=number]").get_attribute("value"))
        == max_new_tokens
    )
    assert float(driver.find_element(By.CSS_SELECTOR, "#temperature input[type=number]").get_attribute("value")) == 0

    def texts(role):  # read in one script call: streamed updates re-render the messages under Selenium's feet
        return driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText)",
            f'#chatbot [data-testid="{role}"]',
        )

    for turn, (query, expected) in enumerate(zip(queries, expected_answers), start=1):
        textbox.send_keys(query)
        driver.find_element(By.ID, "submit_btn").click()
        try:  # streamed: wait for the whole answer, not only its first pieces
            WebDriverWait(driver, 60).until(
                lambda d, turn=turn, expected=expected: texts("bot")[turn - 1 :] == [expected]
            )
        except TimeoutException:
            pass  # the assertions below say what differs
        bots = texts("bot")
        assert len(bots) == turn, f"expected {turn} bot messages, the page shows {bots}"
        assert bots[-1] == expected

    assert texts("user") == queries
    assert textbox.get_attribute("value") == ""

    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(tmp_path / "web_demo.png"))
    shutil.copyfile(tmp_path / "web_demo.png", ARTIFACTS / "web_demo.png")

    driver.find_element(By.ID, "clear_btn").click()
    WebDriverWait(driver, 10).until(lambda d: not texts("bot"))
