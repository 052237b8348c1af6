"""Realistic synthetic Segment-spec events with a ground truth, deterministic by seed.

``generate(events, persons, seed)`` returns the NDJSON lines of a 7-day event stream and a ground
truth dict; ``write`` puts both on disk (``cdi generate``). Every random choice comes from one
``random.Random(seed)``: the same arguments always give the same bytes.

The event mix, per ``events`` lines:

- ~94% valid unique events. Each person has 1-3 devices (web, ios, android); each device has its
  own anonymousId, mobile devices also a ``context.device.id`` and every device a fixed clock skew
  of -120..+120 s. A person's events come in sessions (2-12 events, seconds to a minute apart) spread
  over the 7 days: web sessions are pages and product tracks, mobile sessions screens and product
  tracks. ~70% of persons identify: on one device an ``identify`` (or for some an ``alias``,
  previousId = anonymousId) after some anonymous browsing, usually followed by "Signed Up"; from
  then on that device's events carry userId and anonymousId, and each other device of the person
  logs in (``identify`` with its own anonymousId) at its next session. Emails are sometimes typed in
  mixed case ("Jane.Doe42@Example.com") and some persons also send them in ``context.traits``.
  Every event carries ``context.consent.categoryPreferences``; ~20% of persons change one purpose
  once through a "Consent Updated" track, which the following events reflect.
  Junk identifiers: ~2% of events, from a few identified persons with a buggy client, carry a junk
  anonymousId ("undefined", "null", "anonymous", "0") next to their real userId, and ~8% of mobile
  devices report an all-zero device id that many persons share.
  Late events: ~2% of valid events are whole mobile sessions buffered offline and sent 1-48 h later.
- ~5% duplicate lines: re-sends of an earlier valid line, always after it in the file. Half are
  byte-for-byte copies (an at-least-once redelivery, placed anywhere after the original, usually
  close); half differ only in ``receivedAt``, 1-600 s later (the same request received again),
  placed at their new receive time. A copy's skew-corrected time is therefore later than the
  original's by that shift; ``event_times`` in the truth holds the original's.
- ~1% invalid lines, the reasons spread evenly, each with exactly one problem so the quarantine
  counts per reason are exact (see ``INVALID_REASONS``). They are never duplicated.

Clocks: ``originalTimestamp`` and ``sentAt`` are client clock (true time + the device's skew),
``receivedAt`` is server clock (true send time + 50..500 ms network latency). Skew correction,
``receivedAt - (sentAt - originalTimestamp)``, removes the skew exactly but cannot see the one-way
latency, so it yields the true event time plus that event's latency (at most 500 ms). The truth's
``event_times`` records exactly that corrected time, to the ms, so a pipeline's event time can be
checked for equality. The file is ordered by ``receivedAt`` with up to 1 s of local jitter.

Ground truth keys: ``seed``, ``events``, ``persons``, ``valid_unique``, ``duplicates``, ``invalid``
(reason -> count, reasons that occur), ``late``, ``identities`` (per person the user id, lowercased
emails, anonymous ids and non-junk device ids that appear in its valid events; a device that never
logged in is the person's but cannot be linked from the data), ``linked_identities`` (per person,
the groups of those identifiers that its valid events connect, as stitching keys ``user:<id>``,
``anon:<id>``, ``email:<lowercased>``, ``device_id:<id>``: what a perfect stitcher finds),
``junk_identifiers``, ``event_times`` (messageId -> corrected event time),
``profiles_by_primary_id`` (distinct userId, else anonymousId, over valid unique events) and
``consent_changes``.
"""

from __future__ import annotations

import datetime as dt
import gc
import random
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from transforms.components import find_root

SPAN_MS = 7 * 86_400_000
DUPLICATE_SHARE = 0.05
INVALID_SHARE = 0.01
LATE_SHARE = 0.02
JUNK_SHARE = 0.02
IDENTIFY_SHARE = 0.70
ALIAS_SHARE = 0.15  # of identifying persons: alias instead of identify on the first device
CONSENT_CHANGE_SHARE = 0.20
JUNK_PRONE_SHARE = 0.25  # of identifying persons: a client that sometimes sends a junk anonymousId
JUNK_DEVICE_SHARE = 0.08  # of mobile devices: an all-zero advertising/device id
ORDER_JITTER_MS = 1000

INVALID_REASONS = (
    "decode.malformed_json",
    "decode.not_an_object",
    "event.unknown_type",
    "event.missing_message_id",
    "identity.missing",
    "event.unplanned",
    "schema.required_missing",
    "schema.type_mismatch",
    "schema.additional_property",
    "schema.enum_violation",
)
JUNK_ANONYMOUS_IDS = ("undefined", "null", "anonymous", "0")
# What iOS reports with limited ad tracking, and a common broken Android id.
JUNK_DEVICE_IDS = {"ios": "00000000-0000-0000-0000-000000000000", "android": "0000000000000000"}

_FIRST = ("jane", "john", "maria", "li", "ahmed", "sofia", "lucas", "emma", "noah", "aiko", "omar")
_LAST = ("doe", "smith", "garcia", "chen", "khan", "rossi", "muller", "silva", "kim", "novak")
_DOMAINS = ("example.com", "example.org", "example.net", "mail.example.com")
_CATEGORIES = ("shoes", "bags", "outdoor", "kitchen", "books", "audio")
_INDUSTRIES = ("retail", "software", "finance", "health", "education")
_PAGES = (
    ("Home", "/"),
    ("Products", "/products"),
    ("Product", "/products/{sku}"),
    ("Cart", "/cart"),
    ("Checkout", "/checkout"),
    ("Pricing", "/pricing"),
    ("Blog", "/blog/spring-sale"),
)
_SCREENS = ("Home", "Product List", "Product Detail", "Cart", "Checkout", "Settings")
_REFERRERS = ("", "", "https://www.google.com/", "https://news.example.net/", "https://t.co/x")
_WEB_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.0 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
)
_LIBRARIES = {
    "web": {"name": "analytics.js", "version": "5.2.0"},
    "ios": {"name": "analytics-ios", "version": "4.1.8"},
    "android": {"name": "analytics-android", "version": "4.11.3"},
}
_EPOCH = dt.datetime(1970, 1, 1)


@dataclass(frozen=True)
class Weighted:
    """A weighted choice with its cumulative weights computed once (``rng.choices`` redoes it)."""

    values: tuple
    cumulative: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[Any], weights: Sequence[float]) -> Weighted:
        return cls(tuple(values), tuple(accumulate(weights)))

    def pick(self, rng: random.Random) -> Any:
        return self.values[bisect_right(self.cumulative, rng.random() * self.cumulative[-1])]


_PLATFORMS = Weighted.of(("web", "ios", "android"), (0.5, 0.28, 0.22))
_DEVICE_COUNTS = Weighted.of((1, 2, 3), (0.5, 0.33, 0.17))
_PLANS = Weighted.of(("free", "pro", "enterprise"), (0.6, 0.3, 0.1))
_CURRENCIES = Weighted.of(("USD", "EUR", "GBP"), (0.5, 0.35, 0.15))
_QUANTITIES = Weighted.of((1, 2, 3), (0.8, 0.15, 0.05))
_CONSENT_FLIPS = Weighted.of(("marketing", "advertising", "analytics"), (0.6, 0.3, 0.1))
# Which of a person's devices a later session uses: the first device is the main one.
_SESSION_DEVICE = {n: Weighted.of(range(n), (0.6, 0.25, 0.15)[:n]) for n in (1, 2, 3)}


# --- small helpers -----------------------------------------------------------------------------


def _uuid(rng: random.Random) -> str:
    """A version-4 UUID from the seeded rng (never uuid.uuid4, which is not reproducible)."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _between(rng: random.Random, low: int, high: int) -> int:
    """Like ``rng.randint`` (inclusive) at a fraction of its cost; called a few times per event."""
    return low + int(rng.random() * (high - low + 1))


def _pick(rng: random.Random, seq: Sequence[Any]) -> Any:
    """Like ``rng.choice``, cheaper."""
    return seq[int(rng.random() * len(seq))]


_MINUTES: dict[int, str] = {}


def _iso(ms: int) -> str:
    """Epoch ms as ISO 8601 with milliseconds and Z; exact integer arithmetic, no float seconds."""
    minute, rest = divmod(ms, 60_000)
    prefix = _MINUTES.get(minute)
    if prefix is None:
        # A few minutes hold many events: format each minute once.
        prefix = (_EPOCH + dt.timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:")
        if len(_MINUTES) < 1_000_000:
            _MINUTES[minute] = prefix
    seconds, millis = divmod(rest, 1000)
    return f"{prefix}{seconds:02d}.{millis:03d}Z"


def _instant_ms(text: str) -> int:
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return (t - _EPOCH) // dt.timedelta(milliseconds=1)


def _dumps(event: Any) -> str:
    return orjson.dumps(event).decode()


def split_counts(events: int) -> tuple[int, int, int]:
    """``(valid unique, duplicates, invalid)`` lines for a total of ``events``."""
    invalid = round(events * INVALID_SHARE)
    duplicates = round(events * DUPLICATE_SHARE)
    return events - duplicates - invalid, duplicates, invalid


# --- the cast: catalog, devices, persons -------------------------------------------------------


@dataclass(frozen=True)
class Product:
    product_id: str
    price: float
    category: str


@dataclass(frozen=True)
class Company:
    group_id: str
    name: str
    industry: str
    employees: int


@dataclass(frozen=True)
class Catalog:
    products: tuple[Product, ...]
    companies: tuple[Company, ...]


def _make_catalog(rng: random.Random) -> Catalog:
    products = tuple(
        Product(f"sku_{i:04d}", round(rng.uniform(4, 250), 2), _pick(rng, _CATEGORIES))
        for i in range(1, 121)
    )
    companies = tuple(
        Company(
            f"g_{rng.getrandbits(24):06x}",
            f"{_pick(rng, _LAST).title()} {_pick(rng, ('Labs', 'GmbH', 'Inc', 'Ltd'))} {i}",
            _pick(rng, _INDUSTRIES),
            _pick(rng, (5, 20, 80, 250, 1200)),
        )
        for i in range(1, 41)
    )
    return Catalog(products, companies)


@dataclass(frozen=True)
class Device:
    platform: str  # web | ios | android
    anonymous_id: str
    device_id: str | None  # None on web; a junk value on a few mobile devices
    skew_ms: int  # client clock minus server clock, fixed per device
    context: dict  # the static part of context; copied per event, never mutated


def _make_device(rng: random.Random) -> Device:
    platform = _PLATFORMS.pick(rng)
    bits = rng.getrandbits(24)
    ip = f"{_between(rng, 11, 223)}.{bits >> 16}.{(bits >> 8) & 255}.{(bits & 255) or 1}"
    context: dict[str, Any] = {"library": _LIBRARIES[platform], "ip": ip}
    device_id = None
    if platform == "web":
        context["userAgent"] = _pick(rng, _WEB_AGENTS)
    else:
        junk = rng.random() < JUNK_DEVICE_SHARE
        device_id = JUNK_DEVICE_IDS[platform] if junk else _uuid(rng)
        if platform == "ios":
            os_version = _pick(rng, ("17.6", "18.0", "18.1"))
            model = _pick(rng, ("iPhone14,5", "iPhone15,2", "iPhone16,1"))
            agent = f"ExampleShop/4.12.0 (iPhone; iOS {os_version}; Scale/3.00)"
            device = {"id": device_id, "manufacturer": "Apple", "model": model, "type": "ios"}
            context["os"] = {"name": "iOS", "version": os_version}
        else:
            os_version = _pick(rng, ("13", "14", "15"))
            model = _pick(rng, ("Pixel 8", "SM-S921B", "moto g54"))
            agent = f"Dalvik/2.1.0 (Linux; U; Android {os_version}; {model} Build/AP1A)"
            device = {"id": device_id, "manufacturer": "Google", "model": model, "type": "android"}
            context["os"] = {"name": "Android", "version": os_version}
        context["device"] = device
        context["app"] = {"name": "Example Shop", "version": "4.12.0", "build": "412"}
        context["userAgent"] = agent
    skew = _between(rng, -120_000, 120_000)
    return Device(platform, _uuid(rng), device_id, skew, context)


@dataclass(frozen=True)
class Person:
    key: str  # p0001
    devices: tuple[Device, ...]
    user_id: str | None  # set when the person identifies
    email: str | None  # canonical, lowercase
    typed_email: str | None  # as the person types it: sometimes mixed case
    traits: dict | None  # identify traits minus email
    uses_alias: bool
    email_in_context: bool
    consent: dict  # initial categoryPreferences
    changes_consent: bool
    currency: str
    company: Company
    junk_anonymous_id: str | None  # the junk value this person's buggy client sometimes sends


def _make_person(rng: random.Random, index: int, catalog: Catalog, user_ids: set[str]) -> Person:
    devices = tuple(_make_device(rng) for _ in range(_DEVICE_COUNTS.pick(rng)))
    first, last = _pick(rng, _FIRST), _pick(rng, _LAST)
    consent = {
        "analytics": rng.random() < 0.92,
        "marketing": rng.random() < 0.6,
        "advertising": rng.random() < 0.45,
    }
    identifies = rng.random() < IDENTIFY_SHARE
    user_id = email = typed = traits = junk = None
    uses_alias = in_context = False
    if identifies:
        user_id = f"u_{rng.getrandbits(32):08x}"
        while user_id in user_ids:  # 32 bits collide around 100k persons; ids must be unique
            user_id = f"u_{rng.getrandbits(32):08x}"
        user_ids.add(user_id)
        domain = _pick(rng, _DOMAINS)
        # The person number keeps emails unique across persons.
        email = f"{first}.{last}{index + 1}@{domain}"
        typed = email
        if rng.random() < 0.3:
            typed = f"{first.title()}.{last.title()}{index + 1}@{domain.capitalize()}"
        traits = {
            "name": f"{first.title()} {last.title()}",
            "plan": _PLANS.pick(rng),
            "age": _between(rng, 18, 80),
        }
        uses_alias = rng.random() < ALIAS_SHARE
        # Alias persons always send the email in context: otherwise their only email link would
        # be a login on another device.
        in_context = uses_alias or rng.random() < 0.3
        if rng.random() < JUNK_PRONE_SHARE:
            junk = _pick(rng, JUNK_ANONYMOUS_IDS)
    return Person(
        key=f"p{index + 1:04d}",
        devices=devices,
        user_id=user_id,
        email=email,
        typed_email=typed,
        traits=traits,
        uses_alias=uses_alias,
        email_in_context=in_context,
        consent=consent,
        changes_consent=rng.random() < CONSENT_CHANGE_SHARE,
        currency=_CURRENCIES.pick(rng),
        company=_pick(rng, catalog.companies),
        junk_anonymous_id=junk,
    )


def _allocate(rng: random.Random, total: int, persons: int) -> list[int]:
    """Events per person: at least one each when there are enough, the rest heavy-tailed."""
    budgets = [0] * persons
    if total < persons:
        for i in rng.sample(range(persons), total):
            budgets[i] = 1
        return budgets
    budgets = [1] * persons
    # Activity is heavy-tailed: a few persons produce many events, most produce few.
    weights = [rng.lognormvariate(0, 1) for _ in range(persons)]
    for i in rng.choices(range(persons), weights, k=total - persons):
        budgets[i] += 1
    return budgets


# --- one person's timeline ---------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    person: int
    device: int
    platform: str
    size: int
    end_ms: int  # true time of its last event


class Draft(NamedTuple):
    """A valid event before transport: who, which device and session, when it truly happened.

    A NamedTuple rather than a frozen dataclass: one per event, and it is ~3x cheaper to build.
    """

    person: int
    device: int
    session: int  # index into the global session list
    time_ms: int
    event: dict  # the payload; transport times are added later


def _plan_sessions(rng: random.Random, budget: int, devices: int) -> list[tuple[int, int, int]]:
    """``(start offset ms, device, size)`` per session, in start order."""
    sizes = []
    left = budget
    while left > 0:
        sizes.append(min(left, _between(rng, 2, 12)))
        left -= sizes[-1]
    starts = sorted(_between(rng, 0, SPAN_MS - 3_600_000) for _ in sizes)
    plan = []
    for s, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        # Device i is first used in session i, so every device gets used when there are sessions.
        device = s if s < devices else _SESSION_DEVICE[devices].pick(rng)
        plan.append((start, device, size))
    return plan


def _consent_after(rng: random.Random, prefs: dict) -> dict:
    """The preferences after one change: mostly a marketing opt-out (or opt-in), sometimes another."""
    purpose = _CONSENT_FLIPS.pick(rng)
    changed = dict(prefs)
    changed[purpose] = not prefs[purpose]
    return changed


def _track(name: str, properties: dict) -> dict:
    return {"type": "track", "event": name, "properties": properties}


def _browse(
    rng: random.Random,
    person: Person,
    device: Device,
    logged_in: bool,
    cart: list,
    catalog: Catalog,
) -> dict:
    """The type-specific part of an ordinary event; the cart links views, adds and orders."""
    r = rng.random()
    if r >= 0.95 and not logged_in:
        r -= 0.5  # group calls need a known user: view a product instead
    mobile = device.platform != "web"
    if r < 0.45:
        if mobile:
            return {"type": "screen", "name": _pick(rng, _SCREENS)}
        name, path = _pick(rng, _PAGES)
        path = path.format(sku=_pick(rng, catalog.products).product_id)
        props = {
            "path": path,
            "url": "https://shop.example.com" + path,
            "title": f"{name} | Example Shop",
            "referrer": _pick(rng, _REFERRERS),
        }
        return {"type": "page", "name": name, "properties": props}
    if r < 0.75:
        p = _pick(rng, catalog.products)
        props = {
            "product_id": p.product_id,
            "price": p.price,
            "currency": person.currency,
            "category": p.category,
        }
        return _track("Product Viewed", props)
    if r < 0.88:
        p = _pick(rng, catalog.products)
        quantity = _QUANTITIES.pick(rng)
        cart.append((p, quantity))
        props = {
            "product_id": p.product_id,
            "quantity": quantity,
            "price": p.price,
            "currency": person.currency,
        }
        return _track("Product Added", props)
    if r < 0.95:
        items = list(cart) or [(_pick(rng, catalog.products), 1)]
        cart.clear()
        return _track("Order Completed", _order(rng, items, person.currency))
    c = person.company
    traits = {"name": c.name, "industry": c.industry, "employees": c.employees}
    return {"type": "group", "groupId": c.group_id, "traits": traits}


def _order(rng: random.Random, items: list, currency: str) -> dict:
    return {
        "order_id": f"o_{rng.getrandbits(48):012x}",
        "revenue": round(sum(p.price * q for p, q in items), 2),
        "currency": currency,
        "products": [{"product_id": p.product_id, "quantity": q} for p, q in items],
    }


def _identity_slots(rng: random.Random, person: Person, plan: list) -> tuple[tuple, tuple]:
    """Where the person signs up: ``(session, position)`` of the identify/alias and "Signed Up"."""
    if person.user_id is None or not plan:
        return (), ()
    # Half identify in their first session, the others on a later visit.
    s = 0 if rng.random() < 0.5 else rng.randrange(len(plan))
    size = plan[s][2]
    pos = _between(rng, min(1, size - 1), size - 1)  # usually after some anonymous browsing
    signup = (s, pos + 1) if pos + 1 < size and rng.random() < 0.8 else ()
    return (s, pos), signup


def _simulate_person(
    rng: random.Random,
    index: int,
    person: Person,
    budget: int,
    catalog: Catalog,
    start_ms: int,
    sessions: list[Session],
) -> list[Draft]:
    """Exactly ``budget`` valid events of one person, in true-time order."""
    plan = _plan_sessions(rng, budget, len(person.devices))
    first_session = len(sessions)
    slots = []
    for s, (offset, device, size) in enumerate(plan):
        t = start_ms + offset
        for pos in range(size):
            if pos:
                t += _between(rng, 2_000, 90_000)
            slots.append((t, s, pos))
        sessions.append(Session(index, device, person.devices[device].platform, size, t))
    slots.sort()
    id_slot, signup_slot = _identity_slots(rng, person, plan)
    consent_slot: tuple = ()
    if person.changes_consent and budget >= 3:
        _, s, pos = slots[rng.randrange(1, len(slots))]
        if (s, pos) not in (id_slot, signup_slot):
            consent_slot = (s, pos)

    logged_in = [False] * len(person.devices)
    login_at: dict[int, int] = {}  # session -> position from which its device logs in
    consent = {"categoryPreferences": person.consent}
    cart: list = []
    drafts = []
    for t, s, pos in slots:
        d = plan[s][1]
        device = person.devices[d]
        event: dict[str, Any] = {}
        if (s, pos) == id_slot:
            logged_in[d] = True
            if person.uses_alias:
                event = {"type": "alias", "previousId": device.anonymous_id}
            else:
                event = {"type": "identify", "traits": _identify_traits(rng, person)}
        elif (s, pos) == consent_slot:
            new = _consent_after(rng, consent["categoryPreferences"])
            consent = {"categoryPreferences": new}
            event = _track("Consent Updated", {"categoryPreferences": new})
        elif id_slot and not logged_in[d] and any(logged_in):
            # Another device of an identified person: log in early in the next session.
            at = login_at.setdefault(s, pos + _between(rng, 0, 2))
            if pos >= at or pos == plan[s][2] - 1:
                logged_in[d] = True
                event = {"type": "identify", "traits": _identify_traits(rng, person)}
        elif (s, pos) == signup_slot:
            event = _track("Signed Up", {"method": _pick(rng, ("email", "google", "apple"))})
        if not event:
            event = _browse(rng, person, device, logged_in[d], cart, catalog)
        drafts.append(
            Draft(
                index,
                d,
                first_session + s,
                t,
                _finish(rng, event, person, device, logged_in[d], consent),
            )
        )
    return drafts


def _identify_traits(rng: random.Random, person: Person) -> dict:
    # Mixed-case typists do not type the same way every time.
    email = person.typed_email if rng.random() < 0.5 else person.email
    return {"email": email, **person.traits}


def _finish(
    rng: random.Random, body: dict, person: Person, device: Device, logged_in: bool, consent: dict
) -> dict:
    """The full payload: ids and context around the type-specific body (transport comes later)."""
    event = {"type": body["type"], "messageId": _uuid(rng), "anonymousId": device.anonymous_id}
    if logged_in:
        event["userId"] = person.user_id
    event.update(body)
    context = dict(device.context)
    context["consent"] = consent
    if logged_in and person.email_in_context:
        context["traits"] = {"email": person.typed_email}
    event["context"] = context
    return event


# --- whole-stream decisions --------------------------------------------------------------------


def _apply_junk(
    rng: random.Random, drafts: list[Draft], persons: list[Person], target: int
) -> None:
    """Swap in a junk anonymousId on ``target`` logged-in events of junk-prone persons."""
    pool = [
        d
        for d in drafts
        if persons[d.person].junk_anonymous_id
        and "userId" in d.event
        and d.event["type"] in ("track", "page", "screen")
    ]
    for d in rng.sample(pool, min(target, len(pool))):
        d.event["anonymousId"] = persons[d.person].junk_anonymous_id


def _choose_late(rng: random.Random, sessions: list[Session], target: int) -> set[int]:
    """Whole mobile sessions (web when there are none) buffered offline, ~``target`` events."""
    candidates = [i for i, s in enumerate(sessions) if s.platform != "web"]
    if not candidates:
        candidates = list(range(len(sessions)))
    rng.shuffle(candidates)
    late, total = set(), 0
    for i in candidates:
        if total >= target:
            break
        late.add(i)
        total += sessions[i].size
    return late


def _stamp(
    rng: random.Random,
    drafts: list[Draft],
    persons: list[Person],
    sessions: list[Session],
    late: set[int],
) -> tuple[list[int], list[int]]:
    """Add client and server times to each payload; returns receivedAt and corrected time in ms."""
    flushes: dict[int, tuple[int, int]] = {}
    for s in late:
        # The buffered batch goes out when the device is back online, 1-47 h after its last event.
        send = sessions[s].end_ms + _between(rng, 3_600_000, 47 * 3_600_000)
        flushes[s] = (send, _between(rng, 50, 500))
    received_ms, corrected_ms = [], []
    for d in drafts:
        device = persons[d.person].devices[d.device]
        if d.session in flushes:
            send, latency = flushes[d.session]
        else:
            # Mobile libraries batch for up to ~10 s; analytics.js sends almost at once.
            send = d.time_ms + _between(rng, 0, 500 if device.platform == "web" else 10_000)
            latency = _between(rng, 50, 500)
        received = send + latency
        e = d.event
        e["originalTimestamp"] = _iso(d.time_ms + device.skew_ms)
        e["sentAt"] = _iso(send + device.skew_ms)
        e["receivedAt"] = _iso(received)
        e["source"] = device.platform
        received_ms.append(received)
        corrected_ms.append(d.time_ms + latency)  # what skew correction yields, see the docstring
    return received_ms, corrected_ms


# --- invalid lines -----------------------------------------------------------------------------


def _invalid_line(rng: random.Random, reason: str, base: dict, catalog: Catalog) -> str:
    """A line with exactly one problem, ``reason``, otherwise like the valid ``base`` event."""
    event = {
        k: v
        for k, v in base.items()
        if k not in ("event", "properties", "name", "traits", "groupId", "previousId")
    }
    event["type"] = "track"
    event["messageId"] = _uuid(rng)
    p = _pick(rng, catalog.products)
    viewed = {
        "product_id": p.product_id,
        "price": p.price,
        "currency": "USD",
        "category": p.category,
    }
    order = _order(rng, [(p, 1)], "EUR")
    event["event"], event["properties"] = "Product Viewed", viewed
    if reason == "decode.malformed_json":
        text = _dumps(event)
        # Any proper prefix of a JSON object is invalid JSON: a truncated write.
        return text[: _between(rng, len(text) // 3, len(text) - 2)]
    if reason == "decode.not_an_object":
        # A batch array posted to the single-event endpoint, or a stray scalar.
        return _pick(rng, (_dumps([event]), "42", '"track"', "null"))
    if reason == "event.unknown_type":
        event["type"] = "purchase"
    elif reason == "event.missing_message_id":
        del event["messageId"]
    elif reason == "identity.missing":
        event.pop("anonymousId", None)
        event.pop("userId", None)
    elif reason == "event.unplanned":
        event["event"], event["properties"] = "Button Clicked v2", {"button": "checkout"}
    elif reason == "schema.required_missing":
        del order["order_id"]
        event["event"], event["properties"] = "Order Completed", order
    elif reason == "schema.type_mismatch":
        order["revenue"] = f"{order['revenue']:.2f}"
        event["event"], event["properties"] = "Order Completed", order
    elif reason == "schema.additional_property":
        viewed["color"] = _pick(rng, ("red", "blue", "black"))
    elif reason == "schema.enum_violation":
        viewed["currency"] = "BTC"
    else:
        raise ValueError(f"unknown invalid reason {reason!r}")
    return _dumps(event)


# --- file order --------------------------------------------------------------------------------


def _arrange(
    rng: random.Random,
    lines: list[str],
    received: list[int],
    valid: list[dict],
    duplicates: int,
) -> list[str]:
    """Order lines by receivedAt (jittered) and insert duplicate copies after their originals.

    The first ``len(valid)`` entries of ``lines``/``received`` are the valid events.
    """
    keyed = sorted(
        (r + _between(rng, -ORDER_JITTER_MS, ORDER_JITTER_MS), i) for i, r in enumerate(received)
    )
    keys = [k for k, _ in keyed]
    position = [0] * len(keyed)
    for pos, (_, i) in enumerate(keyed):
        position[i] = pos
    n = len(keyed)
    copies = []
    for c in range(duplicates):
        src = rng.randrange(len(valid))
        after = position[src] + 1
        if rng.random() < 0.5:
            # Byte-for-byte redelivery: usually soon after, sometimes much later.
            line = lines[src]
            at = after + _between(rng, 0, 50) if rng.random() < 0.8 else _between(rng, after, n)
        else:
            # The same request received again 1-600 s later: only receivedAt differs.
            shifted = received[src] + _between(rng, 1_000, 600_000)
            line = _dumps({**valid[src], "receivedAt": _iso(shifted)})
            at = max(
                after,
                bisect_right(keys, shifted + _between(rng, -ORDER_JITTER_MS, ORDER_JITTER_MS)),
            )
        copies.append((min(at, n), c, line))
    copies.sort()
    out: list[str] = []
    j = 0
    for pos, (_, i) in enumerate(keyed):
        while j < len(copies) and copies[j][0] <= pos:
            out.append(copies[j][2])
            j += 1
        out.append(lines[i])
    out.extend(line for _, _, line in copies[j:])
    return out


# --- ground truth ------------------------------------------------------------------------------


def _identities(drafts: list[Draft], persons: list[Person]) -> list[dict]:
    """Per person, the non-junk identifiers its valid events carry."""
    # Per person: user ids, emails, anonymous ids, device ids.
    found = [(set(), set(), set(), set()) for _ in persons]
    junk_devices = set(JUNK_DEVICE_IDS.values())
    for d in drafts:
        e = d.event
        users, emails, anons, devices = found[d.person]
        if "userId" in e:
            users.add(e["userId"])
        for email in (
            e.get("traits", {}).get("email"),
            e["context"].get("traits", {}).get("email"),
        ):
            if email:
                emails.add(email.lower())
        for anon in (e.get("anonymousId"), e.get("previousId")):
            if anon and anon not in JUNK_ANONYMOUS_IDS:
                anons.add(anon)
        device_id = e["context"].get("device", {}).get("id")
        if device_id and device_id not in junk_devices:
            devices.add(device_id)
    return [
        {
            "person": p.key,
            "user_id": next(iter(users), None),
            "emails": sorted(emails),
            "anonymous_ids": sorted(anons),
            "device_ids": sorted(devices),
        }
        for p, (users, emails, anons, devices) in zip(persons, found, strict=True)
    ]


def _event_keys(event: dict, junk_devices: set[str]) -> list[str]:
    """The non-junk identifiers of one valid event as stitching keys (``user:``, ``anon:``,
    ``email:``, ``device_id:``), read from the same fields as :func:`_identities`."""
    keys = []
    if event.get("userId"):
        keys.append("user:" + event["userId"])
    for email in (
        event.get("traits", {}).get("email"),
        event["context"].get("traits", {}).get("email"),
    ):
        if email:
            keys.append("email:" + email.strip().lower())
    for anon in (event.get("anonymousId"), event.get("previousId")):
        if anon and anon not in JUNK_ANONYMOUS_IDS:
            keys.append("anon:" + anon)
    device_id = event["context"].get("device", {}).get("id")
    if device_id and device_id not in junk_devices:
        keys.append("device_id:" + device_id)
    return keys


def _linked_identities(drafts: list[Draft], persons: list[Person]) -> list[dict]:
    """Per person, the groups of identifiers its own valid events connect (the best any
    stitching can do from the data): union-find over the identifiers each event carries together.

    A device that never logged in stays a group of its own: nothing in the data ties it to the
    person, so a stitcher that joined it would be guessing."""
    parent: dict[str, str] = {}  # identifiers never repeat across persons, so one forest serves

    find = partial(find_root, parent)

    owned: list[set[str]] = [set() for _ in persons]
    junk_devices = set(JUNK_DEVICE_IDS.values())
    for d in drafts:
        keys = _event_keys(d.event, junk_devices)
        owned[d.person].update(keys)
        for k in keys:
            parent.setdefault(k, k)
        for k in keys[1:]:
            parent[find(k)] = find(keys[0])
    out = []
    for p, keys in zip(persons, owned, strict=True):
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(find(k), []).append(k)
        out.append({"person": p.key, "groups": sorted(sorted(g) for g in groups.values())})
    return out


def _junk_used(drafts: list[Draft]) -> list[str]:
    junk = set(JUNK_ANONYMOUS_IDS) | set(JUNK_DEVICE_IDS.values())
    used = set()
    for d in drafts:
        for value in (d.event.get("anonymousId"), d.event["context"].get("device", {}).get("id")):
            if value in junk:
                used.add(value)
    return sorted(used)


# --- public API --------------------------------------------------------------------------------


def generate(
    events: int, persons: int, seed: int, start: str = "2026-11-01T00:00:00Z"
) -> tuple[list[str], dict]:
    """``events`` NDJSON lines (no trailing newline) and their ground truth; see the module doc."""
    if events < 0:
        raise ValueError("events must not be negative")
    if persons <= 0:
        raise ValueError("persons must be positive")
    start_ms = _instant_ms(start)
    # The payloads are acyclic, so the cyclic collector finds nothing; it would only re-scan the
    # growing heap again and again (a quarter of the run time at 100k events).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _generate(events, persons, seed, start_ms)
    finally:
        if was_enabled:
            gc.enable()


def _generate(events: int, persons: int, seed: int, start_ms: int) -> tuple[list[str], dict]:
    rng = random.Random(seed)
    n_valid, n_dup, n_invalid = split_counts(events)

    catalog = _make_catalog(rng)
    user_ids: set[str] = set()
    cast = [_make_person(rng, i, catalog, user_ids) for i in range(persons)]
    budgets = _allocate(rng, n_valid, persons)
    sessions: list[Session] = []
    drafts: list[Draft] = []
    for i, person in enumerate(cast):
        if budgets[i]:
            drafts.extend(_simulate_person(rng, i, person, budgets[i], catalog, start_ms, sessions))

    _apply_junk(rng, drafts, cast, round(JUNK_SHARE * n_valid))
    late = _choose_late(rng, sessions, round(LATE_SHARE * n_valid))
    received, corrected = _stamp(rng, drafts, cast, sessions, late)
    lines = [_dumps(d.event) for d in drafts]

    # Evenly spread reasons: cycle through them in a seeded order.
    order = list(INVALID_REASONS)
    rng.shuffle(order)
    reasons = [order[i % len(order)] for i in range(n_invalid)]
    invalid_counts: dict[str, int] = {}
    for reason in reasons:
        b = rng.randrange(n_valid)
        lines.append(_invalid_line(rng, reason, drafts[b].event, catalog))
        received.append(received[b] + _between(rng, 0, 5_000))
        invalid_counts[reason] = invalid_counts.get(reason, 0) + 1

    out = _arrange(rng, lines, received, [d.event for d in drafts], n_dup)

    primary = {d.event.get("userId") or d.event["anonymousId"] for d in drafts}
    truth = {
        "seed": seed,
        "events": len(out),
        "persons": persons,
        "valid_unique": n_valid,
        "duplicates": n_dup,
        "invalid": dict(sorted(invalid_counts.items())),
        "late": sum(1 for d in drafts if d.session in late),
        "identities": _identities(drafts, cast),
        "linked_identities": _linked_identities(drafts, cast),
        "junk_identifiers": _junk_used(drafts),
        "event_times": {
            d.event["messageId"]: _iso(t) for d, t in zip(drafts, corrected, strict=True)
        },
        "profiles_by_primary_id": len(primary),
        "consent_changes": sum(1 for d in drafts if d.event.get("event") == "Consent Updated"),
    }
    return out, truth


def write(out: str, events: int, persons: int, seed: int, truth_path: str | None = None) -> dict:
    """Write the lines to ``out`` and the truth as JSON next to it (or to ``truth_path``)."""
    lines, truth = generate(events, persons, seed)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
    tpath = Path(truth_path) if truth_path else Path(out + ".truth.json")
    tpath.parent.mkdir(parents=True, exist_ok=True)
    tpath.write_bytes(orjson.dumps(truth, option=orjson.OPT_INDENT_2) + b"\n")
    return truth
