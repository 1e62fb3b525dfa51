"""Hard caps on what an untrusted checkpoint header may declare (documented in docs/inspect.md).

Every count and length read from a GGUF or safetensors header is checked against these before anything is
allocated, so a parser's memory and time are bounded by the caps, never by what a file claims. Each cap is
several times what the largest real models need (~100k tensors in one file, 262k-entry vocabularies, headers of
a few MB), and together they keep a header parse under ~100 MB of memory and about a second.
"""

from __future__ import annotations

MiB = 1 << 20

# GGUF
GGUF_MAX_HEADER_BYTES = (
    64 * MiB
)  # magic to the end of the tensor records; real: 2-10 MB (vocabulary + merges)
GGUF_MAX_ARRAY_ELEMENTS = 1 << 20  # one metadata array; real: at most 262,144 (a vocabulary)
GGUF_MAX_TOTAL_ELEMENTS = 1 << 21  # all metadata arrays together; real: ~1M (tokens, scores, types, merges)
GGUF_MAX_NESTED_ELEMENTS = 1 << 16  # elements of arrays of arrays, whole header (llama.cpp refuses them all)
GGUF_MAX_NESTING = 4  # arrays inside arrays
GGUF_READ_CHUNK = 1 * MiB  # the fixed size of one header read

# both formats
MAX_METADATA_KEYS = 1 << 14  # GGUF key/values or safetensors __metadata__ entries; real: 20-60
MAX_TENSORS = 1 << 17  # tensors in one file; real: at most ~100k (in a whole model)
MAX_NAME_BYTES = 1 << 12  # a tensor name or metadata key; real: under 100
MAX_STRING_BYTES = 32 * MiB  # one metadata string (an embedded tokenizer.json); real: under 20 MB
MAX_DIM = 1 << 40  # one tensor dimension

# safetensors
SAFETENSORS_MAX_HEADER_BYTES = 16 * MiB  # the JSON header; real: ~13 MB for 100k tensors in one file
SAFETENSORS_MAX_JSON_DEPTH = 8  # nesting of objects and arrays; a valid header needs 3
SAFETENSORS_MAX_JSON_VALUES = (
    1 << 21
)  # commas (a bound on list items and object members); real: ~6 per tensor
SAFETENSORS_MAX_INT_DIGITS = 20  # decimal digits of one integer: 2**64 has 20
