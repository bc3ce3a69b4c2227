"""Hypothesis strategies that build arbitrary protobuf messages from their descriptors.

Why from descriptors: every request type of the API is covered, including fields added later, without a
hand-written strategy per message. Values lean on the edges: empty, huge, NUL bytes, path tricks, NaN/inf,
negative and extreme integers.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

EDGE_STRINGS = st.sampled_from(
    ["", "/", "..", "../../etc/passwd", "/proc/self/root", "a\0b", "x" * 5000, "busybox", "container", "function", "é☃𝄞", " "]
)
TEXT = st.one_of(EDGE_STRINGS, st.text(max_size=64))
INT64_EDGES = st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)])
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e-9, 1e308]))

# Fields whose valid values make the server act outside this machine: a hostname in `network_allow` is resolved
# through the configured nameserver, so the fuzzer draws only addresses, CIDRs and strings no parser accepts.
ALLOW_ENTRIES = st.sampled_from(
    ["127.0.0.1", "198.18.0.1:80", "10.0.0.0/8", "0.0.0.0/0:443", "1.2.3.4:0", "1.2.3.4:99999", "300.1.1.1",
     "10.0.0.0/33", "", " ", "a b", "..", "a\0b", "::1", "[::1]:80", "x" * 5000, "-bad-:80", "host:port"]
)  # fmt: skip
FIELD_OVERRIDES: dict[str, st.SearchStrategy] = {"network_allow": st.lists(ALLOW_ENTRIES, max_size=4)}

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return TEXT
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=256), st.just(b"\0" * 70_000))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return FLOATS if kind == FieldDescriptor.TYPE_DOUBLE else st.floats(width=32)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return message_dicts(field.message_type, depth + 1)
    low, high = _INT_RANGES[kind]
    return st.one_of(st.integers(low, high), INT64_EDGES.filter(lambda v: low <= v <= high))


def message_dicts(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy:
    """A dict of field name → value for `descriptor`, with at most one member of each oneof set."""
    if depth > 3:
        return st.just({})
    optional: dict[str, st.SearchStrategy] = {}
    for field in descriptor.fields:
        if field.name in FIELD_OVERRIDES:
            optional[field.name] = FIELD_OVERRIDES[field.name]
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            optional[field.name] = st.dictionaries(_scalar(key, depth), _scalar(value, depth), max_size=4)
        elif field.is_repeated:
            optional[field.name] = st.lists(_scalar(field, depth), max_size=4)
        else:
            optional[field.name] = _scalar(field, depth)

    def drop_extra_oneof_members(values: dict) -> dict:
        for oneof in descriptor.oneofs:
            members = [f.name for f in oneof.fields if f.name in values]
            for name in members[1:]:
                del values[name]
        return values

    return st.fixed_dictionaries({}, optional=optional).map(drop_extra_oneof_members)


def build(cls, values: dict):
    """Instantiate message class `cls` from a (nested) dict made by `message_dicts`."""
    message = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                if value_field.message_type is not None:
                    target[k].CopyFrom(build(target[k].__class__, v))
                else:
                    target[k] = v
        elif field.is_repeated:
            if field.message_type is not None:
                for item in value:
                    element = target.add()
                    element.CopyFrom(build(type(element), item))
            else:
                target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(build(target.__class__, value))
        else:
            setattr(message, name, value)
    return message


def messages(cls) -> st.SearchStrategy:
    """Arbitrary instances of protobuf message class `cls`."""
    return message_dicts(cls.DESCRIPTOR).map(lambda values: build(cls, values))
