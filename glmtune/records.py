"""Records -> conversations: the data formats users bring (data/README.md), read by :mod:`glmtune.files`.

Formats (``--data_format``): ``prompt_response`` (named columns; in CSV / TSV a history cell holds JSON), ``alpaca``,
``conversations`` (ChatGLM3 finetune_demo) and ``messages`` (OpenAI style); ``auto`` tells them apart by each
file's first record. Every record becomes one row of :data:`FEATURES`: a system text, ChatGLM3 tool descriptions,
the messages (user, assistant, observation; ``metadata`` names a tool call's tool), whether every reply is trained
(conversations, messages) or only the last (the others), where it came from, and the fields --keep_columns keeps.

A record that does not fit its format stops with a :class:`DataError` naming the file, the line and the field.
"""

import json

import datasets

from glmtune.errors import DataError
from glmtune.files import DATA_README, file_records, is_tabular
from glmtune.prompt import chatglm3_tool_call

CONVERSATION_FORMATS = ("conversations", "messages")
ROLES = ("system", "user", "assistant", "observation", "tool")
ALPACA_FIELDS = "--data_format alpaca: instruction, input, output, history, system"
_MESSAGE = {"role": datasets.Value("string"), "content": datasets.Value("string"), "metadata": datasets.Value("string")}
FEATURES = datasets.Features(
    {
        "system": datasets.Value("string"),
        "tools": datasets.Value("string"),
        "messages": datasets.List(_MESSAGE),
        "every_reply": datasets.Value("bool"),
        "where": datasets.Value("string"),  # file:line, for errors found while building prompts
        "keep": datasets.Value("string"),  # JSON of the --keep_columns fields
    }
)


def detect_format(path: str) -> str:
    """The data format of a file's first record: alpaca (instruction and output), conversations or messages (a
    list under that key), else prompt_response."""
    record = next((record for _, record in file_records(path)), None)
    if not isinstance(record, dict):
        return "prompt_response"
    if "instruction" in record and "output" in record:
        return "alpaca"
    for name in CONVERSATION_FORMATS:
        if isinstance(record.get(name), list):
            return name
    return "prompt_response"


def read_records(path: str, data_format: str, columns=("content", "summary", None), keep_columns=()):
    """Yield a :data:`FEATURES` row for every record of ``path`` in ``data_format``. ``columns``: prompt_response's
    prompt, response and history fields. ``null`` counts as an empty string."""
    tabular = is_tabular(path)
    if tabular and data_format in CONVERSATION_FORMATS:
        raise DataError(
            f"{path}: --data_format {data_format} needs JSON (a list of messages per record); CSV and TSV files hold "
            "prompt_response or alpaca columns"
        )
    count, with_history, first_fields = 0, 0, ""
    history_column = columns[2] if data_format == "prompt_response" else None
    for where, record in file_records(path):
        count += 1
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        first_fields = first_fields or _fields(record)
        with_history += history_column in record
        row = _normalize(where, record, data_format, columns, tabular)
        yield {**row, "where": where, "keep": _kept(where, record, keep_columns)}
    if count == 0:
        raise DataError(f"{path}: no records in the file ({DATA_README})")
    if history_column and not with_history:  # a record may lack it (a first round); a file where none has it: a typo
        raise DataError(
            f"{path}: no record has the field '{history_column}' (--history_column); fields of the first record: "
            f"{first_fields}"
        )


def _normalize(where: str, record: dict, data_format: str, columns, tabular: bool) -> dict:
    if data_format == "alpaca":
        return _alpaca(where, record, tabular)
    if data_format in CONVERSATION_FORMATS:
        return _conversation(where, record, data_format)
    prompt_column, response_column, history_column = columns
    prompt = _text_field(where, record, prompt_column, "--prompt_column")
    response = _text_field(where, record, response_column, "--response_column")
    history = _history_field(where, record, history_column, tabular) if history_column else []
    return _single_reply(prompt, response, history)


def _alpaca(where: str, record: dict, tabular: bool) -> dict:
    instruction = _text_field(where, record, "instruction", ALPACA_FIELDS)
    output = _text_field(where, record, "output", ALPACA_FIELDS)
    extra = _optional_text(where, record, "input")
    # Stanford Alpaca's and ChatGLM-Tuning's order, joined by a newline; the prompt template frames the rest.
    query = f"{instruction}\n{extra}" if extra else instruction
    history = _history_field(where, record, "history", tabular)
    return _single_reply(query, output, history, _optional_text(where, record, "system"))


def _single_reply(query: str, answer: str, history: list, system: str = "") -> dict:
    messages = []
    for old_query, old_answer in history:
        messages += [_message("user", old_query), _message("assistant", old_answer)]
    messages += [_message("user", query), _message("assistant", answer)]
    return {"system": system, "tools": "", "messages": messages, "every_reply": False}


def _message(role: str, content: str, metadata: str = "") -> dict:
    return {"role": role, "content": content, "metadata": metadata}


# ----------------------------------------------------------------------------- conversations, messages


def _conversation(where: str, record: dict, key: str) -> dict:
    if key not in record:
        raise DataError(f"{where}: no field '{key}' (--data_format {key}); fields present: {_fields(record)}")
    value = record[key]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{key}' must be a list of {{role, content}} messages, got {_type(value)}")
    system, messages = [], []
    for index, message in enumerate(value):
        name = f"{key}[{index}]"
        role = _role(where, name, message)
        if role == "system":
            if messages:
                raise DataError(f"{where}: field '{name}': a system message must come before the other messages")
            system.append(_content(where, name, message))
            continue
        _check_order(where, name, messages, role)
        messages += (
            _tool_messages(where, name, message) if role == "tool" else [_message(role, _content(where, name, message))]
        )
    if not messages:
        raise DataError(f"{where}: field '{key}' has no user message")
    if messages[-1]["role"] != "assistant":
        messages.append(_message("assistant", ""))  # no answer: an empty label, and no training sample
    tools = record.get("tools")
    tools = "" if tools is None else json.dumps(tools, indent=4, ensure_ascii=False)
    return {"system": "\n\n".join(system), "tools": tools, "messages": messages, "every_reply": True}


def _role(where: str, name: str, message) -> str:
    if not isinstance(message, dict):
        raise DataError(f"{where}: field '{name}' must be an object with role and content, got {_type(message)}")
    role = message.get("role")
    if role not in ROLES:
        raise DataError(f"{where}: field '{name}.role': unknown role {role!r}; roles: {', '.join(ROLES)}")
    return role


def _content(where: str, name: str, message: dict) -> str:
    if "content" not in message:
        raise DataError(f"{where}: field '{name}' has no 'content'; fields present: {_fields(message)}")
    content = message["content"]
    if content is not None and not isinstance(content, str):
        raise DataError(f"{where}: field '{name}.content' must be a string, got {_type(content)}")
    return content or ""


def _tool_messages(where: str, name: str, message: dict) -> list:
    """ChatGLM3 finetune_demo's tool message: the call (a reply, trained) and its observation (not trained)."""
    tool, parameters = message.get("name"), message.get("parameters")
    if not isinstance(tool, str) or not tool:
        raise DataError(f"{where}: field '{name}.name' must be the tool's name (a string), got {_type(tool)}")
    if not isinstance(parameters, dict):
        raise DataError(f"{where}: field '{name}.parameters' must be an object, got {_type(parameters)}")
    if "observation" not in message:
        raise DataError(f"{where}: field '{name}' has no 'observation' (what the tool returned)")
    observation = message["observation"]
    if not isinstance(observation, str):
        observation = json.dumps(observation, ensure_ascii=False)
    return [_message("assistant", chatglm3_tool_call(parameters), tool), _message("observation", observation)]


def _check_order(where: str, name: str, messages: list, role: str) -> None:
    """The order ChatGLM3's chat format keeps (and a chat needs): a user message first, every user message
    answered before the next, an observation after the tool call it answers."""
    previous = messages[-1]["role"] if messages else None
    if previous is None and role != "user":
        raise DataError(
            f"{where}: field '{name}.role': the first message (after system) must be from the user, got '{role}'"
        )
    if role == "user" and previous == "user":
        raise DataError(f"{where}: field '{name}.role': two user messages in a row (the first has no reply)")
    if role == "observation" and previous != "assistant":
        raise DataError(f"{where}: field '{name}.role': an observation must follow the assistant's tool call")


# ----------------------------------------------------------------------------- fields


def _text_field(where: str, record: dict, column: str, what: str) -> str:
    if column not in record:
        raise DataError(f"{where}: no field '{column}' ({what}); fields present: {_fields(record)}")
    return _optional_text(where, record, column)


def _optional_text(where: str, record: dict, column: str) -> str:
    value = record.get(column)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field '{column}' must be a string, got {_type(value)}")
    return value or ""


def _history_field(where: str, record: dict, column: str, tabular: bool) -> list:
    value = record.get(column)
    if tabular and isinstance(value, str):  # a CSV / TSV cell holds the list as JSON
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: field '{column}' must hold JSON in a CSV / TSV cell ({error.msg})") from None
    if value is None:
        return []
    shape_error = DataError(f"{where}: field '{column}' must be a list of [query, answer] pairs of strings")
    if not isinstance(value, list):
        raise shape_error
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise shape_error
    return value


def _kept(where: str, record: dict, names) -> str:
    missing = [name for name in names if name not in record]
    if missing:
        raise DataError(f"{where}: no field '{missing[0]}' (--keep_columns); fields present: {_fields(record)}")
    return json.dumps({name: record[name] for name in names}, ensure_ascii=False) if names else ""


def _fields(record: dict) -> str:
    return ", ".join(sorted(record)) or "none"


def _type(value) -> str:
    return "null" if value is None else type(value).__name__
