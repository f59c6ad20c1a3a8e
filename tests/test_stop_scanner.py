from tora.backends.base import StopScanner


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    s = StopScanner(stops)
    out = "".join(s.feed(p) for p in pieces)
    return out + s.flush(), s.matched


def test_stop_split_across_pieces_never_leaks() -> None:
    out, matched = feed_all(["```output"], ["print(1)\n```\n``", "`out", "put\nignored"])
    assert out == "print(1)\n```\n"
    assert matched == "```output"


def test_partial_prefix_released_when_ruled_out() -> None:
    out, matched = feed_all(["```output"], ["a ``", "`python\nx"])
    assert out == "a ```python\nx"
    assert matched is None


def test_earliest_of_several_stops_wins() -> None:
    out, matched = feed_all(["\nQuestion:", "```output"], ["done\nQuestion: next ```output"])
    assert (out, matched) == ("done", "\nQuestion:")


def test_held_text_flushed_at_end() -> None:
    out, matched = feed_all(["```output"], ["tail ``"])
    assert (out, matched) == ("tail ``", None)
