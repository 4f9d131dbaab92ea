"""Smoke test of the data plane with the real OpenAI Python SDK.

Run by `tests/it/sdk.rs` against a live gateway whose endpoint echoes the prompt and
reports usage(10, 4). Environment: TOLLGATE_BASE_URL (ending in /v1), TOLLGATE_KEY,
TOLLGATE_REVOKED_KEY, TOLLGATE_SLUG, TOLLGATE_OTHER_SLUG (an endpoint outside the
key's group). Exits non-zero on the first failed check.
"""

import os

import openai

BASE_URL = os.environ["TOLLGATE_BASE_URL"]
KEY = os.environ["TOLLGATE_KEY"]
REVOKED_KEY = os.environ["TOLLGATE_REVOKED_KEY"]
SLUG = os.environ["TOLLGATE_SLUG"]
OTHER_SLUG = os.environ["TOLLGATE_OTHER_SLUG"]

PROMPT = "hello from the sdk"
MESSAGES = [{"role": "user", "content": PROMPT}]


def client(key):
    return openai.OpenAI(base_url=BASE_URL, api_key=key, max_retries=0, timeout=30)


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def plain():
    answer = client(KEY).chat.completions.create(model=SLUG, messages=MESSAGES)
    check(answer.choices[0].message.content == PROMPT, f"plain content: {answer}")
    check(answer.choices[0].finish_reason == "stop", f"plain finish: {answer}")
    check(answer.usage.prompt_tokens == 10, f"plain prompt tokens: {answer.usage}")
    check(answer.usage.completion_tokens == 4, f"plain completion tokens: {answer.usage}")


def streamed(include_usage):
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = client(KEY).chat.completions.create(
        model=SLUG, messages=MESSAGES, stream=True, **options
    )
    parts, usage_chunks, finishes = [], [], []
    for chunk in stream:
        if not chunk.choices:
            usage_chunks.append(chunk.usage)
            continue
        choice = chunk.choices[0]
        parts.append(choice.delta.content or "")
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    check("".join(parts) == PROMPT, f"streamed content: {parts}")
    check(finishes == ["stop"], f"streamed finish reasons: {finishes}")
    if include_usage:
        check(len(usage_chunks) == 1, f"usage chunks: {usage_chunks}")
        check(usage_chunks[0].prompt_tokens == 10, f"usage: {usage_chunks[0]}")
        check(usage_chunks[0].completion_tokens == 4, f"usage: {usage_chunks[0]}")
    else:
        check(usage_chunks == [], f"unexpected usage chunks: {usage_chunks}")


def revoked():
    try:
        client(REVOKED_KEY).chat.completions.create(model=SLUG, messages=MESSAGES)
    except openai.AuthenticationError as error:
        check(error.status_code == 401, f"revoked status: {error.status_code}")
        check(error.code == "invalid_api_key", f"revoked code: {error.code}")
        return
    raise AssertionError("a revoked key was accepted")


def outside_group():
    try:
        client(KEY).chat.completions.create(model=OTHER_SLUG, messages=MESSAGES)
    except openai.NotFoundError as error:
        check(error.status_code == 404, f"outside status: {error.status_code}")
        check(error.code == "model_not_found", f"outside code: {error.code}")
        return
    raise AssertionError("a model outside the group was served")


def main():
    checks = [plain, lambda: streamed(False), lambda: streamed(True), revoked, outside_group]
    for run in checks:
        run()
    print(f"smoke ok: {len(checks)} checks")


if __name__ == "__main__":
    main()
