"""A verifier a recipe names as `module:function` (tests/data/test_verify.py): right when the record
id ends in an even digit, whatever the response; so a test knows every verdict in advance."""


def even_ids(response: str, record: dict) -> bool:
    return int(record["id"][-1]) % 2 == 0
