"""app.py served for real on a free local port with the tiny model: streaming, bad requests, queue, browser."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError, ValidationError

import app
from config import AppConfig, GenerationSettings
from conftest import ROOT

GEN = GenerationSettings(max_new_tokens=40, temperature=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(chat_model):
    cfg = AppConfig(port=free_port(), concurrency_limit=1, max_queue=16)
    demo = app.build_app(chat_model, GEN, cfg)
    app.launch(demo, cfg, block=False)
    url = f"http://127.0.0.1:{cfg.port}/"
    yield url
    demo.close()


@pytest.fixture()
def client(server):
    return Client(server, verbose=False)


def ask(client, message, max_new_tokens=40, temperature=0.0, top_p=0.9):
    return client.predict(message, max_new_tokens, temperature, top_p, api_name="/chat")


def test_streams_a_reply(client):
    job = client.submit("What is the capital of Peru?", 40, 0.0, 0.9, api_name="/chat")
    updates = list(job)
    assert len(updates) >= 3, updates                      # arrived in pieces, not at once
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:]))
    assert job.result() == "The capital of Peru is Lima."


def test_empty_message_gets_a_polite_answer(client):
    assert ask(client, "   ") == app.EMPTY_MESSAGE
    assert ask(client, "") == app.EMPTY_MESSAGE


def test_over_long_message_is_refused_in_the_chat(client):
    reply = ask(client, "word " * 2000, max_new_tokens=40)
    assert reply.startswith("This message is too long for the model")


def test_keeps_serving_after_a_bad_request(client):
    with pytest.raises((AppError, ValidationError)):  # the client is told the request was bad
        ask(client, "What is 2 plus 2?", max_new_tokens="many")
    assert ask(client, "What is the capital of Peru?") == "The capital of Peru is Lima."


def test_many_concurrent_requests_all_answered(server):
    questions = ["What is the capital of Peru?", "What is 2 plus 3?", "Hello! How are you?"] * 3
    with concurrent.futures.ThreadPoolExecutor(max_workers=9) as pool:
        answers = list(pool.map(lambda q: ask(Client(server, verbose=False), q), questions))
    assert all(a for a in answers) and answers[0] == answers[3] == answers[6] == "The capital of Peru is Lima."


def test_client_disconnecting_mid_stream_does_not_break_the_server(client, server):
    job = client.submit("What is the capital of Peru?", 40, 0.0, 0.9, api_name="/chat")
    for _ in job:
        job.cancel()
        break
    time.sleep(0.5)
    assert ask(Client(server, verbose=False), "What is 2 plus 3?")


def test_history_is_passed_through_the_template():
    history = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5."},
               {"role": "user", "content": "failed turn"}]
    messages = app.to_messages(history, "Now add 2.")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[-1]["content"] == "Now add 2."


def test_network_bind_without_auth_is_refused():
    from config import parse_config
    with pytest.raises(SystemExit):
        parse_config(["--app.host", "0.0.0.0"])


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                    reason="Debian chromium not installed (.ci/run installs it; in CI this test always runs)")
def test_real_browser_chat(server):
    from playwright.sync_api import sync_playwright
    shot = ROOT / "reports" / "app-screenshot.png"
    shot.parent.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(server)
        box = page.get_by_role("textbox").first
        box.fill("What is the capital of Peru?")
        box.press("Enter")
        page.wait_for_function("document.body.innerText.includes('Lima')", timeout=90_000)
        page.screenshot(path=str(shot))
        browser.close()
    assert shot.stat().st_size > 10_000
