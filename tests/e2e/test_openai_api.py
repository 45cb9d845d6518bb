"""`homeswarm serve`, the OpenAI-compatible HTTP API, driven with the official `openai` package.

Real processes on 127.0.0.1: a bootstrap peer, two `join-swarm` nodes serving the demo model (blocks
0..1 and 2..3), one more node serving all of it under the name "doomed" (killed by the failure
test), and two `homeswarm serve` processes: one for the demo model, one for "doomed" behind an API
key. Output is checked against `homeswarm generate` and transformers' chat template rendering;
sessions on the nodes are checked through their Info RPC.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from homeswarm.client.chat_template import ChatTemplate
from homeswarm.client.local_swarm import LocalSwarm, console_script
from homeswarm.client.tokenizer import TextCodec
from homeswarm.client.transport import ChannelPool, ping
from homeswarm.model import DEMO_MODEL_DIR

pytestmark = pytest.mark.timeout(120)

MODEL = "demo"  # the folder's name: the served model id by default
DOOMED = "doomed"
API_KEY = "sk-test-4a1f"
PROMPT = "ROMEO:\n"
CHAT_DEFAULT = 6  # the demo API's --default-max-tokens: a chat request without max_tokens stops there
MESSAGES = [{"role": "system", "content": "Speak as a player."}, {"role": "user", "content": "What news, my lord?"}]


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("openai-swarm")) as swarm:
        swarm.start_bootstrap()
        # everything starts at once: the APIs only need the DHT to join, the nodes come up meanwhile
        nodes = [swarm.start_node(DEMO_MODEL_DIR, "--blocks", blocks, "--compute-threads", "1", wait=False)
                 for blocks in ("0:2", "2:4")]
        nodes.append(swarm.start_node(DEMO_MODEL_DIR, "--model-name", DOOMED, "--blocks", "0:4",
                                      "--compute-threads", "1", wait=False))
        swarm.start_api(DEMO_MODEL_DIR, "--default-max-tokens", str(CHAT_DEFAULT), wait=False)
        swarm.start_api(DEMO_MODEL_DIR, "--model-name", DOOMED, "--api-key", API_KEY, wait=False)
        for daemon in [*nodes, *swarm.apis]:
            swarm.wait_ready(daemon, timeout=90)
        yield swarm


@pytest.fixture(scope="module")
def url(swarm) -> str:
    return swarm.apis[0].info["url"]


@pytest.fixture(scope="module")
def generate_cli(swarm):
    """`homeswarm generate --json` of PROMPT, started with the first request to the API: its start-up
    (imports, a DHT peer) takes seconds under load, and runs meanwhile."""
    process = subprocess.Popen(
        [*console_script("homeswarm"), "generate", str(DEMO_MODEL_DIR), "--initial-peers", *swarm.initial_peers,
         "--prompt", PROMPT, "--max-new-tokens", "24", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    yield process
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # with its DHT process and p2pd
    process.communicate()


@pytest.fixture(scope="module")
def client(url, generate_cli) -> openai.OpenAI:
    # no retries: a test must see each answer, not the last of several tries
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    codec = TextCodec.for_model(DEMO_MODEL_DIR)
    assert codec is not None
    return codec


def greedy(client: openai.OpenAI, prompt: str | list[int], max_tokens: int, **kwargs: Any) -> Any:
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)


def raw_request(url: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, JSON body) of a plain HTTP request, for what the openai package cannot send."""
    request = urllib.request.Request(url + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def active_sessions(swarm: LocalSwarm, pool: ChannelPool) -> list[int]:
    """Open sessions on each demo node, from its Info RPC."""
    return [ping(pool, n.info["peer_id"], n.info["address"], timeout=10)[1].active_sessions for n in swarm.nodes[:2]]


def assert_error_body(body: dict[str, Any], code: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


# --- the chat template ----------------------------------------------------------------------------


def test_chat_template_renders_as_transformers_does(codec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))
    template = ChatTemplate.for_model(DEMO_MODEL_DIR)
    assert template is not None, "the demo model ships a chat template"
    conversations = [MESSAGES, [*MESSAGES, {"role": "assistant", "content": "None, sir."},
                                {"role": "user", "content": "Then go — «quickly»!"}]]
    for messages in conversations:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert template.render(messages) == expected
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert codec.encode(template.render(messages), add_special_tokens=False) == list(ids)
    assert template.render(MESSAGES) == "<s>SYSTEM:\nSpeak as a player.\n\nUSER:\nWhat news, my lord?\n\nASSISTANT:\n"
    assert template.render(MESSAGES, add_generation_prompt=False).endswith("my lord?\n\n")


# --- endpoints ------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "homeswarm"
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion(client, codec):
    out = greedy(client, PROMPT, 12)
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    [choice] = out.choices
    assert choice.finish_reason == "length" and choice.index == 0
    assert choice.text and choice.text == greedy(client, PROMPT, 12).choices[0].text  # greedy: repeatable
    assert out.usage.prompt_tokens == len(codec.encode(PROMPT))
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    # the prompt as token ids gives the same completion
    assert greedy(client, codec.encode(PROMPT), 12).choices[0].text == choice.text


def test_sampling_is_seeded(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.95,
                                         seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_streamed_chat_completion(client, codec):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant"
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason == "length"
    # the prompt is the chat template's rendering, tokenized as transformers tokenizes it
    rendered = ChatTemplate.for_model(DEMO_MODEL_DIR).render(MESSAGES)
    assert whole.usage.prompt_tokens == len(codec.encode(rendered, add_special_tokens=False))

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1, "the text arrives in pieces"
    assert "".join(deltas) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_without_max_tokens_stops_at_the_default(client):
    """Not at the end of the context (1,018 more tokens here): --default-max-tokens bounds it."""
    bounded = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=CHAT_DEFAULT, temperature=0)
    started = time.monotonic()
    unbounded = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0)
    assert time.monotonic() - started < 30
    assert unbounded.usage.completion_tokens == bounded.usage.completion_tokens <= CHAT_DEFAULT
    assert unbounded.choices[0].message.content == bounded.choices[0].message.content
    assert unbounded.choices[0].finish_reason == bounded.choices[0].finish_reason
    # and the greedy reply runs to the limit (no end token in the first tokens): the default was what stopped it
    assert bounded.choices[0].finish_reason == "length" and bounded.usage.completion_tokens == CHAT_DEFAULT


def test_serve_help_states_the_default_max_tokens():
    result = subprocess.run([*console_script("homeswarm"), "serve", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    assert "--default-max-tokens" in result.stdout and "default 512" in " ".join(result.stdout.split())


def test_greedy_output_equals_homeswarm_generate(generate_cli, client, codec):
    stdout, stderr = generate_cli.communicate(timeout=90)
    assert generate_cli.returncode == 0, stderr
    expected = json.loads(stdout)
    out = greedy(client, PROMPT, 24)
    assert out.choices[0].text == expected["text"] == codec.decode(expected["token_ids"])
    assert out.usage.completion_tokens == len(expected["token_ids"])
    streamed = "".join(c.choices[0].text for c in greedy(client, PROMPT, 24, stream=True))
    assert streamed == expected["text"]


def test_stop_strings_cut_the_text_and_end_generation(client):
    full = greedy(client, PROMPT, 30).choices[0].text
    stop = full[8:12]
    cut = full.index(stop)
    assert cut > 0 and len(stop) == 4, full
    out = greedy(client, PROMPT, 30, stop=[stop, "never in this text \x00"])
    assert out.choices[0].text == full[:cut]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 30  # generation ended at the stop string
    chunks = list(greedy(client, PROMPT, 30, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"
    one = greedy(client, PROMPT, 1)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1


def test_two_streams_at_once(client):
    prompts = [PROMPT, "JULIET:\n"]
    expected = [greedy(client, p, 40).choices[0].text for p in prompts]
    texts: list[str | None] = [None, None]
    spans: list[tuple[float, float]] = [(0.0, 0.0), (0.0, 0.0)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2, timeout=30)

    def stream(i: int) -> None:
        try:
            barrier.wait()
            parts, first = [], None
            for chunk in greedy(client, prompts[i], 40, stream=True):
                first = first or time.monotonic()
                parts.append(chunk.choices[0].text)
            spans[i] = (first or 0.0, time.monotonic())
            texts[i] = "".join(parts)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert texts == expected
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], "the two generations ran at the same time"


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_model_is_404(client, url):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    status, _, body = raw_request(url, "/no-such-endpoint")
    assert status == 404
    assert_error_body(body)


def test_bad_requests_are_400(client, url):
    status, _, body = raw_request(url, "/completions", b'{"model": "demo", "prompt": ')
    assert status == 400 and "JSON" in body["error"]["message"]
    assert_error_body(body)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2)
    assert e.value.param == "n" and "n=1" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[])
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # the demo template's raise_exception
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert "system, user and assistant" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens beyond max_position_embeddings
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1024)
    assert e.value.code == "context_length_exceeded" and "1024" in e.value.message
    assert_error_body({"error": e.value.body})  # the openai package hands over the inner object


# --- sessions, keys, failures ---------------------------------------------------------------------


def test_disconnect_frees_node_sessions(swarm, client, url):
    pool = swarm.pool()
    try:
        stream = greedy(client, PROMPT, 900, stream=True)
        for i, _chunk in enumerate(stream):
            if i == 5:
                break
        assert all(n >= 1 for n in active_sessions(swarm, pool))
        stream.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 10
        while any(active_sessions(swarm, pool)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert active_sessions(swarm, pool) == [0, 0]

        # not streamed: the client gives up waiting for a 900-token answer and closes the connection
        host, port = url.removeprefix("http://").split("/")[0].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=1.0)
        body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "temperature": 0})
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        deadline = time.monotonic() + 10
        while not all(active_sessions(swarm, pool)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(active_sessions(swarm, pool)), "the generation did not start"
        connection.close()
        deadline = time.monotonic() + 10
        while any(active_sessions(swarm, pool)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert active_sessions(swarm, pool) == [0, 0]
    finally:
        pool.close()


def test_api_key(swarm):
    doomed_url = swarm.apis[1].info["url"]
    status, headers, body = raw_request(doomed_url, "/models")
    assert status == 401 and headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    assert_error_body(body, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=doomed_url, api_key="sk-wrong", max_retries=0, timeout=30).models.list()
    keyed = openai.OpenAI(base_url=doomed_url, api_key=API_KEY, max_retries=0, timeout=30)
    assert [m.id for m in keyed.models.list().data] == [DOOMED]


def test_swarm_failure_mid_stream_then_no_route(swarm):
    keyed = openai.OpenAI(base_url=swarm.apis[1].info["url"], api_key=API_KEY, max_retries=0, timeout=60)
    node = swarm.nodes[2]
    stream = keyed.completions.create(model=DOOMED, prompt=PROMPT, max_tokens=900, temperature=0, stream=True)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    LocalSwarm.kill(node)  # the only node serving "doomed": no replacement exists
    with pytest.raises(openai.APIError) as e:
        for _chunk in chunks:
            pass
    assert "swarm" in e.value.message
    with pytest.raises(openai.InternalServerError) as e:
        keyed.completions.create(model=DOOMED, prompt=PROMPT, max_tokens=4)
    assert e.value.status_code == 503 and "no route" in e.value.message


def test_sigterm_stops_the_server_cleanly(swarm):
    api = swarm.apis[1]
    api.process.send_signal(signal.SIGTERM)
    assert api.process.wait(30) == 0, api.log()[-3000:]
    assert "Traceback" not in api.log(), api.log()[-3000:]
    # nothing of it is left: its DHT process and p2pd are in its process group
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(api.process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("processes of the stopped server are still running")
