"""Schemathesis hooks for fuzzing the service (`SCHEMATHESIS_HOOKS=tests.app.schemathesis_hooks st run ...`).

JSON Schema cannot say that note ids are unique within a request (a missing id counting as the
note's position), so some schema-valid bodies repeat an id, which the service rightly refuses (422).
This hook leaves those bodies out.
"""

import schemathesis


@schemathesis.hook
def filter_body(ctx, body):
    notes = body.get("notes") if isinstance(body, dict) else None
    if not isinstance(notes, list) or not all(isinstance(note, dict) for note in notes):
        return True
    # repr: negative cases may carry unhashable ids (lists, objects)
    ids = [repr(note["id"] if note.get("id") is not None else str(position)) for position, note in enumerate(notes)]
    return len(set(ids)) == len(ids)
