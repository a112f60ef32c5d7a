"""data.shuffle_tags: a caption's comma-separated tags in other orders, drawn once from the seed (cogtune.data.captions)."""

from __future__ import annotations

from cogtune.data.captions import tag_orders

CAPTION = "1girl, red hair, smiling, outdoors, night"


def test_orders_are_permutations_with_the_trigger_first_and_kept_tags_in_place():
    orders = tag_orders(CAPTION, "sks", 6, 1, "tags-0-3")
    assert len(orders) == 6 and len(set(orders)) == 6
    for text in orders:
        tags = text.split(", ")
        assert tags[:2] == ["sks", "1girl"]  # the trigger first, then the one kept tag
        assert sorted(tags[2:]) == sorted(CAPTION.split(", ")[1:])
    assert orders == tag_orders(CAPTION, "sks", 6, 1, "tags-0-3")  # the same key, the same orders
    assert orders != tag_orders(CAPTION, "sks", 6, 1, "tags-1-3")


def test_few_tags_give_few_orders_and_the_trigger_slot_stays():
    assert tag_orders("a dog", None, 4, 0, "k") == ["a dog"]  # one tag: one order, no repeats
    assert sorted(tag_orders("b, a", None, 8, 0, "k")) == ["a, b", "b, a"]
    for text in tag_orders("x, photo of [trigger], y, z", "sks", 5, 0, "k"):
        assert text.split(", ")[1] == "photo of sks"  # the tag with the slot keeps its place
    assert tag_orders("a, b, c", None, 3, 5, "k") == ["a, b, c"]  # keep_tokens beyond the tags: nothing moves
