#!/usr/bin/env bash
# Check the contracts the way CI does, in two steps; exit 1 if either fails.
#
#   scripts/check_proto.sh
#
# 1. Lint: every file under proto/ follows the house rules (Buf style): package
#    citytap.<name>.vN in directory citytap/<name>/vN, proto3, one <Rpc>Request and one
#    <Rpc>Response per RPC, enum zero values <ENUM>_UNSPECIFIED and every value prefixed with
#    the enum's name, a complete-sentence comment on every service, RPC, message, field,
#    oneof, enum and enum value, no floating-point money, timestamps as
#    google.protobuf.Timestamp, and event envelopes of the agreed shape naming their topic.
# 2. Freshness: gen/ is byte-for-byte what scripts/gen_proto.sh makes from proto/ now.
#
# Uses ${CITYTAP_PYTHON:-.venv/bin/python}; relative paths are taken from the repository root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${CITYTAP_PYTHON:-.venv/bin/python}"
command -v "$PY" >/dev/null 2>&1 || { echo "check_proto: no Python at '$PY' (set CITYTAP_PYTHON or create .venv)" >&2; exit 2; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/citytap-check.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

mapfile -t PROTOS < <(find proto -name '*.proto' -type f | LC_ALL=C sort)

# --- 1. lint -----------------------------------------------------------------------------
"$PY" -m grpc_tools.protoc --proto_path=proto --include_source_info \
  --descriptor_set_out="$TMP/protos.binpb" "${PROTOS[@]}"

"$PY" - "$TMP/protos.binpb" <<'LINT'
"""Lint a FileDescriptorSet (with source info) against CityTap's proto rules."""
import re
import sys

from google.protobuf import descriptor_pb2

# Field numbers inside descriptor.proto, used to find each element's comment.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MSG_FIELD, MSG_NESTED, MSG_ENUM, MSG_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2

PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
LOWER_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
PACKAGE = re.compile(r"^citytap\.[a-z][a-z0-9_]*\.v[1-9][0-9]*$")
MONEY_WORDS = re.compile(r"amount|fee|fare|price|balance|total|money|cost")
TOPIC = re.compile(r"citytap\.[a-z][a-z0-9_]*\.v[1-9][0-9]*\.events")
T = descriptor_pb2.FieldDescriptorProto
TIMESTAMP = ".google.protobuf.Timestamp"

problems = []


def upper_snake(name):
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def check_comment(fd, comments, path, what):
    text = comments.get(tuple(path), "").strip()
    where = f"{fd.name}: {what}"
    if not text:
        problems.append(f"{where} has no leading // comment")
        return ""
    if not text[0].isupper():
        problems.append(f"{where}: comment should start with a capital letter: {text[:40]!r}")
    if not text.endswith("."):
        problems.append(f"{where}: comment should end with a full stop: ...{text[-40:]!r}")
    return text


def check_enum(fd, comments, enum, path, scope):
    name = f"{scope}{enum.name}"
    check_comment(fd, comments, path, f"enum {name}")
    if not PASCAL.match(enum.name):
        problems.append(f"{fd.name}: enum {name} should be PascalCase")
    prefix = upper_snake(enum.name) + "_"
    if not enum.value or enum.value[0].number != 0 or enum.value[0].name != prefix + "UNSPECIFIED":
        problems.append(f"{fd.name}: enum {name} must start with {prefix}UNSPECIFIED = 0")
    for i, value in enumerate(enum.value):
        check_comment(fd, comments, path + [ENUM_VALUE, i], f"enum value {value.name}")
        if not UPPER_SNAKE.match(value.name) or not value.name.startswith(prefix):
            problems.append(f"{fd.name}: enum value {value.name} should be UPPER_SNAKE with prefix {prefix}")


def check_message(fd, comments, msg, path, scope):
    name = f"{scope}{msg.name}"
    check_comment(fd, comments, path, f"message {name}")
    if not PASCAL.match(msg.name):
        problems.append(f"{fd.name}: message {name} should be PascalCase")
    for i, oneof in enumerate(msg.oneof_decl):
        check_comment(fd, comments, path + [MSG_ONEOF, i], f"oneof {name}.{oneof.name}")
        if not LOWER_SNAKE.match(oneof.name):
            problems.append(f"{fd.name}: oneof {name}.{oneof.name} should be lower_snake_case")
    for i, field in enumerate(msg.field):
        label = f"field {name}.{field.name}"
        check_comment(fd, comments, path + [MSG_FIELD, i], label)
        if not LOWER_SNAKE.match(field.name):
            problems.append(f"{fd.name}: {label} should be lower_snake_case")
        if field.type in (T.TYPE_FLOAT, T.TYPE_DOUBLE) and MONEY_WORDS.search(field.name):
            problems.append(f"{fd.name}: {label} looks like money but is floating point; use citytap.common.v1.Money")
        if field.name.endswith("_at") and field.type_name != TIMESTAMP:
            problems.append(f"{fd.name}: {label} is a time and should be google.protobuf.Timestamp")
        if field.name.endswith("_id") and field.type != T.TYPE_STRING:
            problems.append(f"{fd.name}: {label} is an id and should be a string")
    for i, nested in enumerate(msg.nested_type):
        if nested.options.map_entry:
            continue  # protoc's own entry type of a map field; the map field carries the comment
        check_message(fd, comments, nested, path + [MSG_NESTED, i], name + ".")
    for i, enum in enumerate(msg.enum_type):
        check_enum(fd, comments, enum, path + [MSG_ENUM, i], name + ".")


def check_envelope(fd, comments, msg, index, topic_service):
    """An event envelope: event_id, occurred_at, account_key, then a payload oneof."""
    label = f"envelope {msg.name}"
    fields = {f.name: f for f in msg.field}
    expected = [("event_id", 1, T.TYPE_STRING, ""), ("occurred_at", 2, T.TYPE_MESSAGE, TIMESTAMP),
                ("account_key", 3, T.TYPE_STRING, "")]
    for fname, number, ftype, type_name in expected:
        f = fields.get(fname)
        if f is None or f.number != number or f.type != ftype or f.type_name != type_name or f.HasField("oneof_index"):
            problems.append(f"{fd.name}: {label} needs field {fname} = {number} of the agreed type")
    oneofs = [o.name for o in msg.oneof_decl]
    if oneofs != ["payload"]:
        problems.append(f"{fd.name}: {label} needs exactly one oneof, named payload")
    for f in msg.field:
        if f.name not in ("event_id", "occurred_at", "account_key") and not f.HasField("oneof_index"):
            problems.append(f"{fd.name}: {label}.{f.name} is outside the payload oneof")
    text = comments.get((FILE_MESSAGE, index), "")
    want = f"citytap.{topic_service}.v1.events"
    if want not in TOPIC.findall(text):
        problems.append(f"{fd.name}: {label} comment must name its topic `{want}`")


fds = descriptor_pb2.FileDescriptorSet.FromString(open(sys.argv[1], "rb").read())
methods_by_type = {}
for fd in fds.file:
    comments = {tuple(loc.path): loc.leading_comments for loc in fd.source_code_info.location}
    directory, _, base = fd.name.rpartition("/")
    if fd.syntax != "proto3":
        problems.append(f"{fd.name}: must use syntax = \"proto3\"")
    if not PACKAGE.match(fd.package) or fd.package != directory.replace("/", "."):
        problems.append(f"{fd.name}: package {fd.package!r} must be citytap.<name>.vN and match its directory")
    if not LOWER_SNAKE.match(base.removesuffix(".proto")):
        problems.append(f"{fd.name}: file name should be lower_snake_case")
    for i, msg in enumerate(fd.message_type):
        check_message(fd, comments, msg, [FILE_MESSAGE, i], "")
    for i, enum in enumerate(fd.enum_type):
        check_enum(fd, comments, enum, [FILE_ENUM, i], "")
    for i, svc in enumerate(fd.service):
        check_comment(fd, comments, [FILE_SERVICE, i], f"service {svc.name}")
        if not PASCAL.match(svc.name) or not svc.name.endswith("Service"):
            problems.append(f"{fd.name}: service {svc.name} should be PascalCase ending in Service")
        for j, method in enumerate(svc.method):
            check_comment(fd, comments, [FILE_SERVICE, i, SERVICE_METHOD, j], f"rpc {svc.name}.{method.name}")
            for type_name, suffix in ((method.input_type, "Request"), (method.output_type, "Response")):
                want = f".{fd.package}.{method.name}{suffix}"
                if type_name != want:
                    problems.append(f"{fd.name}: rpc {method.name} should use {want[1:]}, not {type_name[1:]}")
                methods_by_type.setdefault(type_name, []).append(f"{svc.name}.{method.name}")
    # Event envelopes: a service's events.proto holds exactly one, named <Service>Event.
    envelopes = [(i, m) for i, m in enumerate(fd.message_type) if m.name.endswith("Event")]
    if base == "events.proto":
        service = fd.package.split(".")[1]
        if len(envelopes) != 1:
            problems.append(f"{fd.name}: must define exactly one envelope message ending in Event")
        for i, msg in envelopes:
            check_envelope(fd, comments, msg, i, service)
    elif base == "diagnostics.proto":
        for i, msg in envelopes:
            check_envelope(fd, comments, msg, i, "diagnostics")

for type_name, users in sorted(methods_by_type.items()):
    if len(users) > 1:
        problems.append(f"{type_name[1:]} is used by several RPCs ({', '.join(users)}); each needs its own")

if problems:
    print("proto lint failed:", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    sys.exit(1)
LINT

# --- 2. freshness ------------------------------------------------------------------------
CITYTAP_PYTHON="$PY" scripts/gen_proto.sh "$TMP/gen"

stale() {
  echo "generated code is stale: run make proto" >&2
  for line in "$@"; do echo "  $line" >&2; done
  exit 1
}

[ -d gen ] || stale "gen/ does not exist"

set +e
changes="$(diff -rq -x __pycache__ -x '*.pyc' "$TMP/gen" gen)"
rc=$?
set -e
[ "$rc" -le 1 ] || { echo "check_proto: diff failed (exit $rc)" >&2; exit 2; }
if [ -n "$changes" ]; then
  listed=()
  while IFS= read -r line; do
    case "$line" in
      "Files $TMP/gen/"*)
        f="${line#"Files $TMP/gen/"}"; listed+=("differs:    gen/${f%% and *}") ;;
      "Only in $TMP/gen"*)
        rest="${line#"Only in $TMP/gen"}"; listed+=("missing:    gen${rest%%: *}/${rest#*: }") ;;
      "Only in gen"*)
        rest="${line#"Only in gen"}"; listed+=("unexpected: gen${rest%%: *}/${rest#*: }") ;;
      *) listed+=("$line") ;;
    esac
  done <<<"$changes"
  stale "${listed[@]}"
fi
echo "proto: lint clean, gen/ up to date (${#PROTOS[@]} files)"
