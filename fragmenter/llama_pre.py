"""llama.cpp's pre-tokenizers for byte-level BPE vocabularies (`tokenizer.ggml.model ==
"gpt2"`), by `tokenizer.ggml.pre`: the regexes of `llm_tokenizer_bpe` in llama.cpp's
`src/llama-vocab.cpp` (as vendored by llama-cpp-python 0.3.36), applied one after the
other, each to the pieces the previous one left, matches and the text between them
kept as pieces of their own (Hugging Face `Split`, behavior "Isolated").

Left out: the pre-tokenizers llama.cpp does not run as byte-level BPE (`gemma4`,
`granite-embed-multi-311m` and `sarvam-moe`, which `tokenizer.py` writes as BPE on raw
UTF-8, and `whitespace`) and those it implements in code rather than by regex (`kimi-k2`,
`afmoe`, `tiny_aya`, `cohere2moe`, `superbpe`); for these and unknown values
`tokenizer.py` falls back to GPT-2's regex, which llama.cpp would not.
"""

from __future__ import annotations

# Regex lists, keyed by the name of one llama.cpp pre-tokenizer type using them
# (the comment lists them all).
_SPLITS: dict[str, tuple[str, ...]] = {
    "llama3": (  # chatglm4, dbrx, llama3, smaug
        (
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
            r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "jais2": (  # jais2
        (
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
            r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|"
            r"\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
        ),
    ),
    "deepseek-llm": (  # deepseek_llm
        "[\r\n]",
        (
            "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370"
            "-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
            "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
            "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b"
            "\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
            "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
            "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
            "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
            "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8"
            "-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
        ),
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+$",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        r"\p{N}+",
    ),
    "deepseek3-llm": (  # deepseek3_llm, hunyuan_dense, hy_v4, joyai_llm
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        (
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
            " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
        ),
    ),
    "spark2-5": (  # spark2_5
        r"\p{N}{1,3}",
        "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        (
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
            " ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+"
        ),
        r"\p{N}",
    ),
    "youtu": (  # youtu
        (
            "[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f"
            "\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
        ),
        (
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|"
            r"'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+["
            r"\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|"
            r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "deepseek-coder": (  # deepseek_coder
        "[\r\n]",
        r"\s?\p{L}+",
        r"\s?\p{P}+",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        r"\p{N}",
    ),
    "falcon": (  # falcon
        r"[\p{P}\$\+<=>\^~\|`]+",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
        r"[0-9][0-9][0-9]",
    ),
    "starcoder": (  # codeshell, command_r, exaone, mellum2, minerva, refact, smollm, starcoder
        r"\p{N}",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    ),
    "gpt2": (  # gpt2, granite_docling, jais, mpt, olmo, trillion
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    ),
    "qwen2": (  # grok_2, hunyuan, qwen2, solar_open, stablelm2
        (
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
            r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "qwen35": (  # qwen35
        (
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|"
            r"\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "bloom": (  # bloom, gpt3_finnish, poro
        " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",
    ),
    "viking": (  # viking
        " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",
        r"\p{N}",
    ),
    "tekken": (  # tekken
        (
            r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z])"
            r")+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "chameleon": (  # chameleon
        r"<sentinel:[0-9]+>",
        r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        r"([\t\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    ),
    "gpt4o": (  # gpt4o, minimax_m2
        (
            r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|"
            r"'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'["
            r"sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "granite-emb-multi": (  # granite_emb_multi
        (
            r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|"
            r"'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p"
            r"{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}|"
            r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "bailingmoe": (  # bailingmoe
        (
            r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]|\s+(?!\S)|\s+"
        ),
    ),
    "seed-coder": (  # seed_coder
        (
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
            r"\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "ufakzeka": (  # ufakzeka
        r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "laguna": (  # laguna
        r"[^\n]+|[\n]+",
        (
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
            r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "exaone-moe": (  # exaone_moe
        (
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p"
            r"{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
        ),
    ),
    "minicpm5": (  # minicpm5
        r"\p{N}{1,3}",
        (
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
            r"\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "default": (  # default
        r"[\p{P}\$\+<=>\^~\|]+",
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    ),
}

# `tokenizer.ggml.pre` -> its regexes (a key of _SPLITS) and whether llama.cpp takes a
# whole pre-token that is in the vocabulary as one token (`ignore_merges`).
_PRE: dict[str, tuple[str, bool]] = {
    "default": ("default", False),
    "minicpm5": ("minicpm5", True),
    "llama3": ("llama3", True),
    "llama-v3": ("llama3", True),
    "llama-bpe": ("llama3", True),
    "falcon3": ("llama3", True),
    "falcon-h1": ("llama3", True),
    "pixtral": ("llama3", True),
    "midm-2.0": ("llama3", True),
    "lfm2": ("llama3", True),
    "jina-v5-nano": ("llama3", True),
    "deepseek-llm": ("deepseek-llm", False),
    "deepseek-coder": ("deepseek-coder", False),
    "deepseek-v3": ("deepseek3-llm", False),
    "spark2_5": ("spark2-5", False),
    "youtu": ("youtu", True),
    "falcon": ("falcon", False),
    "mpt": ("gpt2", False),
    "starcoder": ("starcoder", False),
    "gpt-2": ("gpt2", False),
    "phi-2": ("gpt2", False),
    "jina-es": ("gpt2", False),
    "jina-de": ("gpt2", False),
    "gigachat": ("gpt2", False),
    "jina-v2-es": ("gpt2", False),
    "jina-v2-de": ("gpt2", False),
    "a.x-4.0": ("gpt2", False),
    "mellum": ("gpt2", False),
    "modern-bert": ("gpt2", False),
    "jais-2": ("jais2", False),
    "jina-v1-en": ("gpt2", False),
    "jina-v2-code": ("gpt2", False),
    "roberta-bpe": ("gpt2", False),
    "refact": ("starcoder", False),
    "command-r": ("starcoder", False),
    "qwen2": ("qwen2", False),
    "deepseek-r1-qwen": ("qwen2", False),
    "kormo": ("qwen2", False),
    "f2llmv2": ("qwen2", False),
    "qwen35": ("qwen35", False),
    "stablelm2": ("qwen2", False),
    "olmo": ("gpt2", False),
    "dbrx": ("llama3", False),
    "smaug-bpe": ("llama3", False),
    "poro-chat": ("bloom", False),
    "chatglm-bpe": ("llama3", False),
    "glm4": ("llama3", True),
    "glm5": ("llama3", True),
    "viking": ("viking", False),
    "jais": ("gpt2", False),
    "tekken": ("tekken", True),
    "smollm": ("starcoder", False),
    "codeshell": ("starcoder", False),
    "bloom": ("bloom", False),
    "gpt3-finnish": ("bloom", False),
    "exaone": ("starcoder", False),
    "exaone4": ("gpt2", False),
    "exaone-moe": ("exaone-moe", False),
    "chameleon": ("chameleon", False),
    "minerva-7b": ("starcoder", False),
    "megrez": ("qwen2", False),
    "gpt-4o": ("gpt4o", False),
    "llama4": ("gpt4o", False),
    "kanana2": ("gpt4o", False),
    "talkie": ("gpt4o", False),
    "granite-embed-multi-97m": ("granite-emb-multi", True),
    "trillion": ("gpt2", False),
    "granite-docling": ("gpt2", False),
    "bailingmoe": ("bailingmoe", False),
    "bailingmoe2": ("bailingmoe", False),
    "llada-moe": ("bailingmoe", False),
    "seed-coder": ("seed-coder", False),
    "hunyuan": ("qwen2", False),
    "hunyuan-dense": ("deepseek3-llm", False),
    "hy_v4": ("deepseek3-llm", False),
    "joyai-llm": ("deepseek3-llm", False),
    "ufakzeka": ("ufakzeka", False),
    "grok-2": ("qwen2", False),
    "laguna": ("laguna", False),
    "minimax-m2": ("gpt4o", False),
    "solar-open": ("qwen2", False),
    "mellum2": ("starcoder", False),
}


# The pre-tokenizers for which llama.cpp adds BOS when `tokenizer.ggml.add_bos_token`
# is absent (for the others, byte-level BPE adds none).
ADD_BOS = frozenset(
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")
    + ("tekken", "chameleon")
)


def pre_tokenizer_regexes(pre: str) -> tuple[tuple[str, ...], bool] | None:
    """llama.cpp's regexes for this `tokenizer.ggml.pre` and its `ignore_merges`, or None."""
    entry = _PRE.get(pre)
    if entry is None:
        return None
    group, ignore_merges = entry
    return _SPLITS[group], ignore_merges
