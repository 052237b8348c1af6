"""Order-independent sums: the same terms in any order, grouping or merge give the same total."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from transforms import exact_sum
from transforms.computed_traits import agg_add, agg_init, agg_merge, agg_value
from transforms.profile import TraitRules, empty_profile, fold_event, merge_profiles, profile_row

_NUMBERS = st.lists(
    st.one_of(
        st.integers(-(10**12), 10**12),
        st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False),
        st.sampled_from([0.1, 0.2, 0.3, 326.17, 19.99, 1e-9]),
    ),
    max_size=40,
)


def _total(terms) -> int | float:
    acc = exact_sum.new()
    for t in terms:
        exact_sum.add(acc, t)
    return exact_sum.value(acc)


def test_the_float_order_trap_is_closed():
    terms = [0.1, 0.2, 0.3]
    assert sum(terms) != sum(reversed(terms))  # the trap: plain float sums depend on order
    assert _total(terms) == _total(list(reversed(terms))) == math.fsum(terms)
    assert _total([1, 2, 3]) == 6 and isinstance(_total([1, 2, 3]), int)


@given(_NUMBERS, st.randoms(use_true_random=False), st.integers(0, 40))
def test_any_order_and_any_split_then_merge_give_the_same_total(terms, rnd, cut):
    shuffled = list(terms)
    rnd.shuffle(shuffled)
    left, right = exact_sum.new(), exact_sum.new()
    for t in shuffled[:cut]:
        exact_sum.add(left, t)
    for t in shuffled[cut:]:
        exact_sum.add(right, t)
    merged = exact_sum.merge(right, left)
    assert exact_sum.value(merged) == _total(terms)
    ints = sum(t for t in terms if isinstance(t, int))
    floats = math.fsum(t for t in terms if not isinstance(t, int))
    assert _total(terms) == (float(ints) + floats if ints else floats) or not any(
        not isinstance(t, int) for t in terms
    )


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=20), st.randoms())
def test_sum_trait_and_increment_trait_do_not_depend_on_order(amounts, rnd):
    shuffled = list(amounts)
    rnd.shuffle(shuffled)

    def trait(order):
        half = len(order) // 2
        a, b = agg_init("sum"), agg_init("sum")
        for x in order[:half]:
            a = agg_add("sum", a, x, 0)
        for x in order[half:]:
            b = agg_add("sum", b, x, 0)
        return agg_value("sum", agg_merge("sum", a, b))

    assert trait(amounts) == trait(shuffled)

    def incremented(order):
        rules = TraitRules(increment=frozenset({"spent"}))
        parts = [empty_profile(), empty_profile()]
        for i, x in enumerate(order):
            ev = {"type": "identify", "messageId": f"m{i}", "traits": {"spent": x}}
            fold_event(parts[i % 2], ev, i, [], rules)
        return profile_row("p", merge_profiles(parts[1], parts[0]))["traits"]

    assert incremented(amounts) == incremented(shuffled)


def test_integer_sums_beyond_64_bits_are_given_as_floats():
    """Three increments of 2**63 - 1 exceed what a JSON writer carries as an integer (the
    profile row then failed to encode: a corpus line); the sum is the nearest float."""
    acc = exact_sum.new()
    for _ in range(3):
        exact_sum.add(acc, 2**63 - 1)
    assert exact_sum.value(acc) == float(3 * (2**63 - 1))
    assert isinstance(exact_sum.value(acc), float)
    assert exact_sum.value(exact_sum.add(exact_sum.new(), 2**64 - 1)) == 2**64 - 1
    huge = exact_sum.add(exact_sum.new(), 10**400)
    assert exact_sum.value(huge) == math.inf
