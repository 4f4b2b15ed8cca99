"""safe_url: what the images stage publishes of a URL (issue 14.1, image parts)."""

import pytest

from vlpref.images.urls import is_credential_param, safe_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.test/a.png", "https://example.test/a.png"),
        ("http://user:hunter2@example.test/a.png", "http://example.test/a.png"),
        ("http://token@example.test:8080/a.png", "http://example.test:8080/a.png"),
        ("https://example.test/a.png?token=abc&w=100", "https://example.test/a.png?w=100"),
        (
            "https://bucket.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIA%2F20240101&X-Amz-Date=20240101T000000Z&X-Amz-Expires=60"
            "&X-Amz-SignedHeaders=host&X-Amz-Signature=deadbeef&versionId=3",
            "https://bucket.s3.amazonaws.com/a.png?versionId=3",
        ),
        (
            "https://storage.googleapis.com/b/a.png?X-Goog-Algorithm=GOOG4-RSA-SHA256"
            "&X-Goog-Credential=x&X-Goog-Signature=cafe",
            "https://storage.googleapis.com/b/a.png",
        ),
        (
            "https://acct.blob.core.windows.net/c/a.png?sv=2022-11-02&ss=b&srt=o&sp=r"
            "&se=2030-01-01&st=2024-01-01&spr=https&sig=c2VjcmV0",
            "https://acct.blob.core.windows.net/c/a.png",
        ),
        (
            "https://cdn.test/a.png?Expires=1&Signature=abc&Key-Pair-Id=K&Policy=p",
            "https://cdn.test/a.png?Key-Pair-Id=K",
        ),
        ("https://x.test/a.png?api_key=1&apiKey=2&access_token=3", "https://x.test/a.png"),
        ("https://x.test/a.png?X-API-KEY=1&client_secret=2&auth=3", "https://x.test/a.png"),
        ("https://x.test/a.png?page=2#access_token=abc", "https://x.test/a.png?page=2"),
        ("https://x.test/a%20b.png?q=a+b&flag", "https://x.test/a%20b.png?q=a+b&flag"),
        ("http://[::1]:8000/a.png?key=1", "http://[::1]:8000/a.png"),
    ],
)
def test_safe_url(url: str, expected: str) -> None:
    assert safe_url(url) == expected


def test_an_unsplittable_url_keeps_only_what_is_surely_safe() -> None:
    assert safe_url("http://user:pw@[::1/a.png?token=1") == "http://[::1/a.png"


@pytest.mark.parametrize(
    "name", ["token", "TOKEN", "csrf_token", "x-amz-security-token", "my%5Fsecret", "session_id"]
)
def test_credential_names(name: str) -> None:
    assert is_credential_param(name)


@pytest.mark.parametrize("name", ["w", "width", "format", "versionId", "page", "author", "q"])
def test_ordinary_names(name: str) -> None:
    assert not is_credential_param(name)
