"""serve.py's chat page at /, in a real browser: Debian's headless Chromium, driven through
chromedriver by selenium, types questions as a user does and reads what the page shows. The
streamed replies must be the API's own replies to the same conversation (greedy, fp64 tiny
model), turn after turn; Clear forgets the history; Stop ends a reply; a keyed server asks for
its key. The README's test command installs chromium and chromium-driver where it can (as root,
with apt); elsewhere these tests skip, saying so in a line, except under CI, where they fail."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch
from conftest import ROOT, sharpen_
from test_serve import make_server

from data.template import CHAT_SAMPLING
from model import CONFIGS, Transformer
from pretrained import save_model
from tokenizer import Tokenizer

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

MAX_TOKENS = 12


BROWSERS = ("chromium", "chromium-browser", "google-chrome")  # Debian's, Ubuntu's, Google's
HOW_TO_ENABLE = (
    "the chat page's browser tests need Chromium and chromedriver on PATH: as root on Debian the "
    "README's test command installs them (apt-get install chromium chromium-driver); elsewhere "
    "install Chromium or Chrome and its chromedriver"
)


def find_browser(environ, which=shutil.which) -> tuple[str, str]:
    """(browser, chromedriver) on PATH. Missing: under CI (CI=true, as CI runs .ci/run) the
    tests fail, since CI must run them; elsewhere they skip with a line saying how to enable them
    (a learner's laptop without root or apt runs the rest of the suite)."""
    chromium, driver = next(filter(None, map(which, BROWSERS)), None), which("chromedriver")
    if chromium and driver:
        return chromium, driver
    if environ.get("CI") == "true":
        pytest.fail(f"CI=true and {HOW_TO_ENABLE}")
    pytest.skip(HOW_TO_ENABLE)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = find_browser(os.environ)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # Headless as root, and none of Chromium's own connections out (this machine has no network).
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,800",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def readable_model(tmp_path_factory, tokenizer_file):
    """The tiny configuration with random weights whose replies are text: the output rows of
    the byte pieces zeroed, so greedy decoding picks whole pieces (bytes alone decode to U+FFFD,
    and one reply of replacement characters looks like another)."""
    tok = Tokenizer(tokenizer_file)
    model = sharpen_(Transformer.from_config(CONFIGS["tiny"], seed=3))  # replies that depend on the context
    with torch.no_grad():
        for i in range(len(tok)):
            if tok.sp.is_byte(i):
                model.lm_head.weight[i] = 0
    out = tmp_path_factory.mktemp("web") / "m"
    save_model(model, out, tokenizer=tokenizer_file)
    return out


@pytest.fixture(scope="module")
def server(readable_model):
    s = make_server(readable_model)
    yield s
    s.shutdown()


def page_url(server) -> str:
    return server.base_url.removesuffix("/v1") + "/"


def api_reply(server, messages, key=None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = requests.post(
        server.base_url + "/chat/completions",
        headers=headers,
        timeout=60,
        json={"model": "huatuo-tiny", "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def state(b) -> str:
    return b.find_element(By.ID, "status").get_attribute("data-state")


def replies(b) -> list[str]:
    """What the page shows of each reply: the text node's content, exactly (no whitespace folding)."""
    return b.execute_script("return [...document.querySelectorAll('.turn.assistant .text')].map(e => e.textContent)")


def wait_for_reply(b, n: int):
    WebDriverWait(b, 60).until(lambda b: len(replies(b)) == n and state(b) == "idle")
    return replies(b)[-1]


def type_into(b, element_id: str, text: str):
    field = b.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def open_page(b, server):
    b.get(page_url(server))
    WebDriverWait(b, 30).until(lambda b: b.find_element(By.ID, "model").text == "huatuo-tiny")
    type_into(b, "temperature", "0")
    type_into(b, "max-tokens", str(MAX_TOKENS))


def test_a_consultation_in_the_browser_streams_the_apis_replies_turn_after_turn(browser, server):
    b = browser
    open_page(b, server)
    # The page's sampling defaults are chat.py's (data.template.CHAT_SAMPLING), as it opened.
    b.refresh()
    WebDriverWait(b, 30).until(lambda b: b.find_element(By.ID, "model").text == "huatuo-tiny")
    shown = {k: float(b.find_element(By.ID, k).get_attribute("value")) for k in ("temperature", "top-p", "max-tokens")}
    assert shown == {
        "temperature": CHAT_SAMPLING["temperature"],
        "top-p": CHAT_SAMPLING["top_p"],
        "max-tokens": CHAT_SAMPLING["max_new_tokens"],
    }
    type_into(b, "temperature", "0")
    type_into(b, "max-tokens", str(MAX_TOKENS))

    first, second = "我最近三天一直头痛，需要去医院吗？", "还有点发烧，38度"
    type_into(b, "question", first)
    b.find_element(By.ID, "question").send_keys(Keys.ENTER)  # Enter sends
    one = wait_for_reply(b, 1)
    assert one and one == api_reply(server, [{"role": "user", "content": first}])
    assert b.find_element(By.ID, "question").get_attribute("value") == ""

    type_into(b, "question", second)
    b.find_element(By.ID, "send").click()
    two = wait_for_reply(b, 2)
    history = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": one},
        {"role": "user", "content": second},
    ]
    assert two == api_reply(server, history)  # the second turn was asked with the first in its history
    assert two != api_reply(server, history[2:])  # ... which changes the reply (else this test shows nothing)

    b.find_element(By.ID, "clear").click()
    assert replies(b) == [] and b.find_element(By.ID, "empty").is_displayed()
    type_into(b, "question", second)
    b.find_element(By.ID, "send").click()
    assert wait_for_reply(b, 1) == api_reply(server, history[2:])  # Clear forgot the history


def test_stop_ends_a_reply_and_the_page_goes_on(browser, server):
    b = browser
    open_page(b, server)
    type_into(b, "max-tokens", "1000")
    type_into(b, "question", "请详细介绍高血压的治疗")
    b.find_element(By.ID, "send").click()
    WebDriverWait(b, 60).until(lambda b: state(b) == "streaming" and len(replies(b)) == 1 and replies(b)[0])
    b.find_element(By.ID, "stop").click()
    WebDriverWait(b, 30).until(lambda b: state(b) == "idle")
    assert b.find_element(By.ID, "status").text == "stopped"
    assert "stopped" in b.find_element(By.CSS_SELECTOR, ".turn.assistant").get_attribute("class")
    stopped = replies(b)[0]
    type_into(b, "max-tokens", str(MAX_TOKENS))
    type_into(b, "question", "谢谢")
    b.find_element(By.ID, "send").click()
    assert wait_for_reply(b, 2) == api_reply(
        server,
        [
            {"role": "user", "content": "请详细介绍高血压的治疗"},
            {"role": "assistant", "content": stopped},
            {"role": "user", "content": "谢谢"},
        ],
    )  # the stopped reply stays in the history, as shown


def test_a_keyed_server_serves_the_page_and_the_page_asks_for_the_key(browser, readable_model):
    b = browser
    keyed = make_server(readable_model, api_key="s3cret")
    try:
        page = requests.get(page_url(keyed), timeout=10)
        assert page.status_code == 200 and page.text == (ROOT / "serve.html").read_text(encoding="utf-8")  # no key
        policy = page.headers["Content-Security-Policy"]  # its own inline script and style, by digest, and no more
        assert policy.startswith("default-src 'none'; script-src 'sha256-") and "connect-src 'self'" in policy
        assert requests.get(keyed.base_url + "/models", timeout=10).status_code == 401  # the API does
        b.get(page_url(keyed))
        WebDriverWait(b, 30).until(lambda b: b.find_element(By.ID, "key-row").is_displayed())
        assert b.find_element(By.ID, "status").text == "this server needs an API key"
        type_into(b, "temperature", "0")
        type_into(b, "max-tokens", str(MAX_TOKENS))
        type_into(b, "question", "头痛")
        type_into(b, "key", "wrong")  # issue 35 item 3.5: the page said "needs an API key" again
        b.find_element(By.ID, "send").click()
        WebDriverWait(b, 30).until(
            lambda b: b.find_element(By.ID, "status").text == "the API key was refused: enter it and send again"
        )
        assert b.find_element(By.ID, "question").get_attribute("value") == "头痛"  # kept, to send again
        type_into(b, "key", "s3cret")
        b.find_element(By.ID, "send").click()
        assert wait_for_reply(b, 1) == api_reply(keyed, [{"role": "user", "content": "头痛"}], key="s3cret")
        assert b.find_element(By.ID, "model").text == "huatuo-tiny"
    finally:
        keyed.shutdown()


# -- where there is no browser ------------------------------------------------------------------------


def test_without_a_browser_ci_fails_and_elsewhere_the_tests_skip_saying_how_to_enable_them(tmp_path):
    def nothing(name):
        return None

    with pytest.raises(pytest.fail.Exception, match="CI=true and the chat page's browser tests need"):
        find_browser({"CI": "true"}, nothing)
    with pytest.raises(pytest.skip.Exception, match="the chat page's browser tests need Chromium"):
        find_browser({}, nothing)

    def only_chromium(name):
        return f"/usr/bin/{name}" if name == "chromium" else None

    with pytest.raises(pytest.skip.Exception):  # a browser without its driver is no browser here
        find_browser({}, only_chromium)
    assert find_browser({"CI": "true"}, lambda name: f"/x/{name}") == ("/x/chromium", "/x/chromedriver")
    # The whole path, as a learner's run meets it: a PATH with neither, CI unset. The browser
    # tests skip (each before any model is built) and the run says in one line how to enable them.
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("PYTEST_")}
    names = [
        test_a_consultation_in_the_browser_streams_the_apis_replies_turn_after_turn.__name__,
        test_stop_ends_a_reply_and_the_page_goes_on.__name__,
        test_a_keyed_server_serves_the_page_and_the_page_asks_for_the_key.__name__,
    ]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:xdist",
        "-p",
        "no:cacheprovider",
        "--basetemp",
        str(tmp_path / "run"),
        *(f"{Path(__file__)}::{name}" for name in names),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, PATH=str(tmp_path)), cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "3 skipped" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert [line for line in proc.stdout.splitlines() if HOW_TO_ENABLE in line] == [f"skipped (3): {HOW_TO_ENABLE}"]


# -- the doctors' review page (review.py, issue 45) -----------------------------------------------------------


@pytest.fixture
def study_server(tmp_path, tokenizer_file):
    """A study of two reviewers over two small hand-written answer files whose names, and the
    models' names, must appear nowhere in what the page shows or is sent."""
    import threading
    from types import SimpleNamespace

    import review

    files = []
    for name in ("secret-model-a", "secret-model-b"):
        path = tmp_path / f"{name}.jsonl"
        lines = [
            {
                "id": f"q{i}",
                "messages": [
                    {"role": "user", "content": f"问题 {i}：头痛怎么办？"},
                    {"role": "assistant", "content": f"<b>回答{name[-1]}</b> {i}"},  # shown as text
                ],
            }
            for i in range(6)
        ]
        path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
        files.append(path)
    args = SimpleNamespace(
        a=str(files[0]),
        b=str(files[1]),
        name_a="ModelNameA",
        name_b="ModelNameB",
        reviewers=2,
        sample=None,
        seed=0,
        out=str(tmp_path / "study"),
    )
    s = review.ReviewServer(review.open_study(args), port=0)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    s.base = f"http://127.0.0.1:{s.server_address[1]}"
    yield s
    s.shutdown()
    s.server_close()


def review_state(b) -> dict:
    return b.execute_script(
        "return {progress: document.getElementById('progress').textContent,"
        " context: document.getElementById('context').textContent,"
        " pressed: [...document.querySelectorAll('button.choice[aria-pressed=true]')].map(x => x.dataset.row + '=' + x.dataset.value),"
        " status: document.getElementById('status').textContent}"
    )


def test_a_reviewer_gives_verdicts_with_the_keyboard_blind_and_finds_them_after_a_reload(browser, study_server):
    """Issue 45: a reviewer opens their link, sees no model's or file's name in the page's text
    or source, gives verdicts with the keyboard (1 / 2 / t for the highlighted row, ↓ to the
    aspects, → to the next item), reloads and finds them; a second reviewer's page shows the
    items in another order."""
    from selenium.webdriver.common.action_chains import ActionChains

    links = study_server.links(study_server.base)
    browser.get(links[0])
    WebDriverWait(browser, 30).until(lambda b: review_state(b)["progress"].startswith("1 / 6"))
    for secret in ("ModelNameA", "ModelNameB", "secret-model", ".jsonl"):
        assert secret not in browser.page_source and secret not in browser.find_element(By.TAG_NAME, "body").text

    def keys(*k):
        ActionChains(browser).send_keys(*k).perform()

    first_contexts = [review_state(browser)["context"]]
    keys("1")  # overall: Response 1
    WebDriverWait(browser, 30).until(lambda b: review_state(b)["status"] == "saved")
    keys(Keys.ARROW_DOWN, "t")  # diagnosis: a tie
    WebDriverWait(browser, 30).until(lambda b: "diagnosis=tie" in review_state(b)["pressed"])
    keys(Keys.ARROW_RIGHT)
    first_contexts.append(review_state(browser)["context"])
    keys("2")
    WebDriverWait(browser, 30).until(lambda b: review_state(b)["status"] == "saved")
    assert len(study_server.verdicts.of(0)) == 2 and not study_server.verdicts.of(1)
    browser.refresh()  # the fragment stays; the page goes on where the reviewer was
    WebDriverWait(browser, 30).until(lambda b: review_state(b)["progress"].startswith("3 / 6 (2 judged)"))
    keys(Keys.ARROW_LEFT)
    assert review_state(browser)["pressed"] == ["overall=2"]
    keys(Keys.ARROW_LEFT)
    assert sorted(review_state(browser)["pressed"]) == ["diagnosis=tie", "overall=1"]
    browser.get(links[1])
    WebDriverWait(browser, 30).until(lambda b: review_state(b)["progress"].startswith("1 / 6 (0 judged)"))
    theirs = [review_state(browser)["context"]]
    keys(Keys.ARROW_RIGHT)
    theirs.append(review_state(browser)["context"])
    keys(Keys.ARROW_RIGHT)
    theirs.append(review_state(browser)["context"])
    order = [study_server.study.plans[r]["order"] for r in range(2)]
    assert order[0] != order[1] and theirs == [f"病人 (patient)问题 {i[1:]}：头痛怎么办？" for i in order[1][:3]]
    assert "<b>回答" in browser.find_element(By.ID, "r1").text  # model text is text, never markup
