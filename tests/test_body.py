"""The chat request body (SPEC §3): the message text that routing and estimates read."""

from __future__ import annotations

from typing import Any

import pytest

from arbstr_core.request.body import last_user_text, message_text


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# --- message text -------------------------------------------------------------------------------


def test_message_text_of_a_string() -> None:
    assert message_text("hello") == "hello"


def test_message_text_of_an_array_keeps_only_text_parts() -> None:
    content = [
        {"type": "text", "text": "first"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,code"}},
        {"type": "text", "text": "second"},
        "not a part",
        {"type": "text", "text": 5},
    ]
    text = message_text(content)
    assert "first" in text and "second" in text
    assert "code" not in text and "image" not in text


@pytest.mark.parametrize("content", [None, 5, {"text": "x"}, []])
def test_message_text_of_anything_else_is_empty(content: Any) -> None:
    assert message_text(content) == ""


def test_last_user_text_skips_later_assistant_messages() -> None:
    messages = [user("one"), {"role": "assistant", "content": "two"}, user("three"),
                {"role": "assistant", "content": "four"}, {"role": "tool", "content": "five"}]
    assert last_user_text(messages) == "three"


def test_last_user_text_without_a_user_message() -> None:
    assert last_user_text([{"role": "system", "content": "code"}]) == ""
    assert last_user_text([]) == ""
    assert last_user_text(["junk", None, 3]) == ""
