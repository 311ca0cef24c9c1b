"""The official `openai` client against `seer serve` running the tiny LLaVA fixture.

Run by run.sh, which starts the server and sets SEER_URL and SEER_API_KEY. Each test
sends a fixture case greedily (temperature 0, 16 tokens, past end-of-sequence) and
expects transformers' reference answer from tests/fixtures/llava/cases/tiny-llava-hub.
"""

import base64
import functools
import http.server
import json
import os
import pathlib
import sys
import threading
import traceback

import openai

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "llava"
MODEL = "tiny-llava-hub"

client = openai.OpenAI(base_url=os.environ["SEER_URL"] + "/v1", api_key=os.environ["SEER_API_KEY"], max_retries=0)
GREEDY = {"model": MODEL, "max_tokens": 16, "temperature": 0, "extra_body": {"ignore_eos": True}}


def case(name):
    return json.loads((FIXTURES / "cases" / MODEL / f"{name}.json").read_text())


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def image_server():
    """Serves the fixture images on 127.0.0.1 (seer runs with --allow-private-urls)."""
    handler = functools.partial(QuietHandler, directory=str(FIXTURES))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}"


def data_url(path):
    mime = "image/jpeg" if path.endswith(".jpg") else "image/png"
    data = base64.b64encode((FIXTURES / path).read_bytes()).decode()
    return f"data:{mime};base64,{data}"


def messages(reference, image_url):
    """The case's conversation with each image given as `image_url(path)`."""
    out = []
    for m in reference["messages"]:
        parts = []
        for p in m["content"]:
            if p["type"] == "text":
                parts.append({"type": "text", "text": p["text"]})
            else:
                parts.append({"type": "image_url", "image_url": {"url": image_url(p["path"]), "detail": "auto"}})
        out.append({"role": m["role"], "content": parts})
    return out


def check_answer(reply, reference):
    choice = reply.choices[0]
    assert choice.message.content == reference["greedy_text"], (choice.message.content, reference["greedy_text"])
    assert choice.finish_reason == "length", choice.finish_reason
    assert reply.usage.prompt_tokens == len(reference["input_ids"]), reply.usage
    assert reply.usage.completion_tokens == 16, reply.usage


def test_image_from_a_url():
    base = image_server()
    reference = case("a_square")
    reply = client.chat.completions.create(messages=messages(reference, lambda p: f"{base}/{p}"), **GREEDY)
    check_answer(reply, reference)


def test_base64_images():
    for name in ["b_wide", "c_two_images"]:
        reference = case(name)
        reply = client.chat.completions.create(messages=messages(reference, data_url), **GREEDY)
        check_answer(reply, reference)


def test_system_message_as_a_string():
    reference = case("e_system")
    msgs = messages(reference, data_url)
    msgs[0] = {"role": "system", "content": reference["messages"][0]["content"][0]["text"]}
    check_answer(client.chat.completions.create(messages=msgs, **GREEDY), reference)


def test_streaming():
    reference = case("d_multi_turn")
    stream = client.chat.completions.create(
        messages=messages(reference, data_url), stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["greedy_text"], (text, reference["greedy_text"])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"], finishes
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(reference["input_ids"])


def test_models():
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_errors_raise_the_clients_exceptions():
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]
    try:
        client.chat.completions.create(messages=bad, **GREEDY)
        raise AssertionError("a bad image was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "base64" in str(e), e
    wrong_key = openai.OpenAI(base_url=os.environ["SEER_URL"] + "/v1", api_key="wrong", max_retries=0)
    try:
        wrong_key.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e


def main():
    tests = [(name, f) for name, f in globals().items() if name.startswith("test_") and callable(f)]
    failed = 0
    for name, test in tests:
        try:
            test()
            print(f"ok   {name}")
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    print(f"{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
