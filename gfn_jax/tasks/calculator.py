"""A calculator tool for chain-of-thought arithmetic (the paper's §4.4 set-up).

The policy writes a rationale such as ``6 - 0 =, 6 - 4 =, 2 - 8 =``; every time it has
just written ``=``, the calculator evaluates the expression between the previous separator
(``,`` or ``.``, or the start of Z) and that ``=`` and splices ``" " + str(value)`` into the
trajectory, one token per sampling step, giving ``6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6``. Spliced
tokens are not actions of the policy (the sampler gives them ``action_mask`` False and
``log_pf`` 0) but they stay in the context of every later step and of re-scoring.

Two implementations of one rule:

* :func:`evaluate_expression` parses text on the host (a hand-written lexer and recursive
  descent parser; model text is never passed to ``eval``/``exec`` or any code evaluator).
* :class:`CalculatorTool` is a hashable, jittable :class:`gfn_jax.sampling.Tool` that applies
  the same grammar to token ids with precomputed lookup tables and a ``lax.scan`` state
  machine over the characters of the trajectory.

Grammar (a subset of Python's integer expressions with the same meaning)::

    expr    := term (('+' | '-') term)*
    term    := unary ('*' unary)*
    unary   := '-'* primary             (unary minus, repeatable; no unary plus)
    primary := DIGITS | '(' expr ')'    (decimal literal, leading zeros allowed)

Spaces (``' '`` only) may appear between lexemes and separate literals (``"1 2"`` is
malformed). Anything else is malformed: other characters, an empty expression, ``**``,
dangling operators, unbalanced parentheses, nesting deeper than ``max_depth`` (8), and any
literal, product, partial sum or parenthesised value whose magnitude exceeds
:data:`VALUE_LIMIT` (999,999,999, so that int32 arithmetic inside jit is exact).

Malformed fallback: **nothing is spliced** and the policy simply continues. This is what
the paper's release does (its sampler wraps the evaluation in ``try``/``except`` and leaves
the sequence unchanged on failure), it adds no token the reward LM never saw in the data,
and it keeps the tool's rule stateless. The same fallback applies to a well-formed value
outside the splice table (``|value| > max_abs``, default 9,999).

Differences from the release, on purpose: the release re-tokenizes the whole text after each
splice and does not count spliced tokens against the length limit; here each spliced token
is one sampling step (so ``PolicySpec.max_len`` bounds policy *and* tool tokens), and when
``max_len`` is reached mid-splice the row simply ends there (a partial value; its final
prefix must terminate as for any row that reaches ``max_len``). A trajectory can never
terminate mid-splice, because forced tokens are never termination ids (checked when the
tool is built, given the policy's termination ids).
"""

from __future__ import annotations

import hashlib
from typing import Any, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "VALUE_LIMIT",
    "MAX_DEPTH",
    "CalculatorTool",
    "evaluate_expression",
    "splice_text",
    "rationale_trajectory",
]

VALUE_LIMIT = 999_999_999
"""Largest magnitude of any literal, intermediate or final value (2 * limit < 2**31)."""

MAX_DEPTH = 8
"""Deepest parenthesis nesting accepted."""

DEFAULT_SEPARATORS = ",."
DEFAULT_MAX_ABS = 9_999


# ---------------------------------------------------------------------------
# Host-side evaluator
# ---------------------------------------------------------------------------
class _Malformed(Exception):
    pass


def _lex(text: str, limit: int) -> List[Any]:
    """Lexemes: ints for literals, one-character strings for operators and parentheses."""
    out: List[Any] = []
    num: Optional[int] = None
    for ch in text:
        if "0" <= ch <= "9":
            num = (0 if num is None else num) * 10 + (ord(ch) - 48)
            if num > limit:
                raise _Malformed("literal too large")
            continue
        if num is not None:
            out.append(num)
            num = None
        if ch == " ":
            continue
        if ch in "+-*()":
            out.append(ch)
        else:
            raise _Malformed(f"character {ch!r}")
    if num is not None:
        out.append(num)
    return out


class _Parser:
    def __init__(self, lexemes: List[Any], limit: int, max_depth: int) -> None:
        self.lx = lexemes
        self.i = 0
        self.limit = limit
        self.max_depth = max_depth

    def peek(self) -> Any:
        return self.lx[self.i] if self.i < len(self.lx) else None

    def take(self) -> Any:
        x = self.peek()
        self.i += 1
        return x

    def check(self, v: int) -> int:
        if abs(v) > self.limit:
            raise _Malformed("value too large")
        return v

    def expr(self, depth: int) -> int:
        v = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            t = self.term(depth)
            v = self.check(v + t if op == "+" else v - t)
        return v

    def term(self, depth: int) -> int:
        v = self.unary(depth)
        while self.peek() == "*":
            self.take()
            v = self.check(v * self.unary(depth))
        return v

    def unary(self, depth: int) -> int:
        neg = False
        while self.peek() == "-":
            self.take()
            neg = not neg
        v = self.primary(depth)
        return -v if neg else v

    def primary(self, depth: int) -> int:
        x = self.take()
        if isinstance(x, int):
            return x
        if x == "(":
            if depth + 1 > self.max_depth:
                raise _Malformed("nested too deeply")
            v = self.expr(depth + 1)
            if self.take() != ")":
                raise _Malformed("missing ')'")
            return v
        raise _Malformed(f"unexpected {x!r}")


def evaluate_expression(
    text: Any, *, limit: int = VALUE_LIMIT, max_depth: int = MAX_DEPTH
) -> Optional[int]:
    """The integer value of ``text`` under the module's grammar, or None if malformed.

    Never evaluates code: a lexer and a recursive descent parser whose recursion depth is
    bounded by ``max_depth``; time is linear in ``len(text)``.
    """
    if not isinstance(text, str):
        return None
    try:
        lexemes = _lex(text, limit)
        if not lexemes:
            return None
        p = _Parser(lexemes, limit, max_depth)
        v = p.expr(0)
        if p.i != len(lexemes):
            return None
        return v
    except _Malformed:
        return None


def splice_text(value: int) -> str:
    """The text the calculator splices after ``=`` (as the release: a space, then the value)."""
    return " " + str(int(value))


# ---------------------------------------------------------------------------
# Character classes shared by the lookup tables and the jitted state machine
# ---------------------------------------------------------------------------
C_NONE = 0  # padding inside a token's character slots (skipped)
# 1..10: digits 0..9
C_PLUS, C_MINUS, C_MUL, C_LPAR, C_RPAR, C_SPACE, C_EQ, C_SEP, C_OTHER = range(11, 20)
_CLASS_OF = {"+": C_PLUS, "-": C_MINUS, "*": C_MUL, "(": C_LPAR, ")": C_RPAR, " ": C_SPACE,
             "=": C_EQ}


def _char_classes(text: str, separators: str) -> List[int]:
    out = []
    for ch in text:
        if "0" <= ch <= "9":
            out.append(1 + ord(ch) - 48)
        elif ch in separators:
            out.append(C_SEP)
        else:
            out.append(_CLASS_OF.get(ch, C_OTHER))
    return out


def _compress(classes: List[int]) -> List[int]:
    """A shorter class string with the same meaning everywhere the tool looks.

    Only what follows the last separator matters (a separator resets the expression), and
    runs collapse without changing the grammar's verdict or value: spaces and OTHERs to
    one, separators to one, ``-`` runs to their parity (1 or 2: only parity matters whether
    the first is binary or unary), ``=``, ``*``, ``+`` runs to at most two (two of them are
    malformed wherever they are read, and the last character is kept).
    """
    if C_SEP in classes:
        last = len(classes) - 1 - classes[::-1].index(C_SEP)
        classes = [C_SEP] + classes[last + 1 :]
    out: List[int] = []
    i = 0
    while i < len(classes):
        c = classes[i]
        j = i
        while j < len(classes) and classes[j] == c:
            j += 1
        n = j - i
        if c in (C_SPACE, C_OTHER, C_SEP):
            n = 1
        elif c == C_MINUS:
            n = 1 if n % 2 else 2
        elif c in (C_EQ, C_MUL, C_PLUS):
            n = min(n, 2)
        out.extend([c] * n)
        i = j
    return out


def _token_repr(text: str, separators: str, width: int) -> Tuple[List[int], bool]:
    """Classes of one token, at most ``width`` long; True if it had to be truncated.

    A class string still longer than ``width`` after :func:`_compress` keeps its separator
    (if any), then OTHER (its expression reads as malformed), then its last character (so a
    token ending in ``=`` still triggers the tool, on a malformed expression).
    """
    r = _compress(_char_classes(text, separators))
    if len(r) <= width:
        return r, False
    head = [C_SEP] if r[0] == C_SEP else []
    r = head + [C_OTHER, r[-1]] if r[-1] != C_OTHER else head + [C_OTHER]
    return r, True


# ---------------------------------------------------------------------------
# The jittable tool
# ---------------------------------------------------------------------------
def _eval_scan(chars: jax.Array, active: jax.Array, limit: int, max_depth: int):
    """Evaluate the active characters of every row; ``chars``/``active`` are [N, C].

    Returns (value int32 [N], valid bool [N]). A vectorised state machine for the grammar of
    :func:`evaluate_expression` (one ``lax.scan`` step per character, fixed-size stack).
    """
    N = chars.shape[0]
    D = max_depth
    i32 = jnp.int32
    L = jnp.asarray(limit, i32)
    rows = jnp.arange(N)

    def apply_primary(s, v, when):
        # the pending unary minus, then the pending '*'
        v = jnp.where(s["neg"], -v, v)
        a = jnp.abs(s["term"])
        over = s["mul"] & (a > 0) & (jnp.abs(v) > L // jnp.maximum(a, 1))
        term = jnp.where(s["mul"], s["term"] * v, v)
        return dict(
            s,
            term=jnp.where(when, term, s["term"]),
            mul=jnp.where(when, False, s["mul"]),
            neg=jnp.where(when, False, s["neg"]),
            operand=jnp.where(when, False, s["operand"]),
            err=s["err"] | (when & over),
        )

    def close_sum(s):
        v = s["sum"] + s["sign"] * s["term"]
        return v, jnp.abs(v) > L

    def step(s, x):
        c, act = x
        is_digit = (c >= 1) & (c <= 10)
        d = (c - 1).astype(i32)
        # A literal ends at the first non-digit character.
        end_num = act & s["innum"] & ~is_digit
        s = apply_primary(dict(s, innum=s["innum"] & ~end_num), s["num"], end_num)
        operand = s["operand"]
        err = s["err"]
        # digits
        cont = act & is_digit & s["innum"]
        start = act & is_digit & ~s["innum"] & operand
        err = err | (act & is_digit & ~s["innum"] & ~operand)
        err = err | (cont & (s["num"] > (L - d) // 10))
        num = jnp.where(cont, s["num"] * 10 + d, jnp.where(start, d, s["num"]))
        innum = s["innum"] | start
        # '+' / '-' as binary operators, '-' as unary minus
        binary = act & ((c == C_PLUS) | (c == C_MINUS)) & ~operand
        err = err | (act & (c == C_PLUS) & operand)
        unary = act & (c == C_MINUS) & operand
        v, over = close_sum(s)
        err = err | (binary & over)
        sum_ = jnp.where(binary, v, s["sum"])
        sign = jnp.where(binary, jnp.where(c == C_MINUS, -1, 1), s["sign"]).astype(i32)
        neg = jnp.where(unary, ~s["neg"], s["neg"])
        # '*'
        mul_op = act & (c == C_MUL)
        err = err | (mul_op & operand)
        mul = s["mul"] | (mul_op & ~operand)
        # '(' pushes the frame
        lpar = act & (c == C_LPAR)
        err = err | (lpar & (~operand | (s["depth"] >= D)))
        push = lpar & operand & (s["depth"] < D)
        onehot = (jnp.arange(D)[None, :] == s["depth"][:, None]) & push[:, None]
        stk = {k: jnp.where(onehot, s[k][:, None], s["stk_" + k])
               for k in ("sum", "sign", "term", "mul", "neg")}
        new = dict(
            s, num=num, innum=innum, sum=sum_, sign=sign, neg=neg, mul=mul, err=err,
            operand=operand | binary | (mul_op & ~operand),
            depth=s["depth"] + push.astype(i32),
        )
        for k in ("sum", "sign", "term", "mul", "neg"):
            new["stk_" + k] = stk[k]
        new["sum"] = jnp.where(push, 0, new["sum"])
        new["sign"] = jnp.where(push, 1, new["sign"]).astype(i32)
        new["term"] = jnp.where(push | binary, 0, new["term"])
        new["mul"] = jnp.where(push | binary, False, new["mul"])
        new["neg"] = jnp.where(push, False, new["neg"])
        # ')' closes the frame: its value is a primary of the outer frame
        rpar = act & (c == C_RPAR)
        bad_r = rpar & (operand | (s["depth"] == 0))
        pop = rpar & ~bad_r
        pv, pover = close_sum(new)
        top = jnp.clip(new["depth"] - 1, 0, D - 1)
        popped = {k: new["stk_" + k][rows, top] for k in ("sum", "sign", "term", "mul", "neg")}
        for k in ("sum", "sign", "term", "mul", "neg"):
            new[k] = jnp.where(pop, popped[k], new[k])
        new["depth"] = new["depth"] - pop.astype(i32)
        new["err"] = new["err"] | bad_r | (pop & pover)
        new = apply_primary(new, pv, pop)
        # anything else read inside an expression is malformed
        other = act & ((c == C_EQ) | (c == C_SEP) | (c == C_OTHER))
        new["err"] = new["err"] | other
        return new, None

    z = jnp.zeros((N,), i32)
    f = jnp.zeros((N,), bool)
    zs = jnp.zeros((N, D), i32)
    fs = jnp.zeros((N, D), bool)
    init = dict(
        num=z, innum=f, sum=z, sign=z + 1, term=z, mul=f, neg=f, operand=~f, err=f, depth=z,
        stk_sum=zs, stk_sign=zs + 1, stk_term=zs, stk_mul=fs, stk_neg=fs,
    )
    s, _ = jax.lax.scan(step, init, (chars.T.astype(i32), active.T))
    s = apply_primary(dict(s, innum=jnp.zeros_like(s["innum"])), s["num"], s["innum"])
    v, over = close_sum(s)
    valid = ~s["err"] & ~s["operand"] & (s["depth"] == 0) & ~over
    return jnp.where(valid, v, 0), valid


class CalculatorTool:
    """Hashable, jittable calculator for :func:`gfn_jax.sampling.sample` (``tool=``).

    Stateless rule, evaluated before every step from the tokens generated so far: let ``j``
    be the last token whose text ends with ``=`` (a *trigger*, e.g. ``" ="`` or ``"="``) and
    ``k`` the number of tokens after it. If the expression between the last separator before
    that ``=`` (or the start of Z) and the ``=`` is well formed with ``|value| <= max_abs``
    and ``S = encode(" " + str(value))`` has more than ``k`` tokens, the next token is forced
    to ``S[k]``. Because the splice is forced, the ``k`` tokens already after ``j`` are exactly
    ``S[:k]``, so no state needs to be carried between steps.

    Build with :meth:`from_tokenizer`. Equality and hash use a digest of the tables, so two
    tools built from the same tokenizer and options share one jit cache entry.

    Cost: each call re-reads the whole trajectory, a ``lax.scan`` of ``T * width`` character
    steps over ``[N]`` vectors (the tables are jit constants: ``[V, width]`` int8 and
    ``[2 * max_abs + 1, M]`` int32). That is cheap for rationale lengths (tens of tokens);
    for long trajectories a windowed variant would be the next step.
    """

    def __init__(
        self,
        char_table: np.ndarray,
        splice_tokens: np.ndarray,
        splice_len: np.ndarray,
        *,
        max_abs: int,
        max_depth: int,
        limit: int = VALUE_LIMIT,
        num_truncated: int = 0,
        separators: str = DEFAULT_SEPARATORS,
    ) -> None:
        self.char_table = np.ascontiguousarray(char_table, np.int8)  # [V, K]
        self.splice_tokens = np.ascontiguousarray(splice_tokens, np.int32)  # [2R+1, M]
        self.splice_len = np.ascontiguousarray(splice_len, np.int32)  # [2R+1]
        self.max_abs = int(max_abs)
        self.max_depth = int(max_depth)
        self.limit = int(limit)
        self.num_truncated = int(num_truncated)
        self.separators = str(separators)
        if self.splice_tokens.shape[0] != 2 * self.max_abs + 1:
            raise ValueError("splice table must have 2 * max_abs + 1 rows")
        if not 0 < self.max_abs <= self.limit or not 2 * self.limit < 2**31:
            raise ValueError("need 0 < max_abs <= limit and 2 * limit < 2**31")
        if self.max_depth < 1:
            raise ValueError("max_depth must be >= 1")
        tab = self.char_table.astype(np.int32)
        nonempty = tab != C_NONE
        last = np.where(nonempty.any(1), tab.shape[1] - 1 - np.argmax(nonempty[:, ::-1], 1), 0)
        self.last_offset = last.astype(np.int32)  # [V] slot of each token's last class
        self.is_trigger = nonempty.any(1) & (tab[np.arange(len(tab)), last] == C_EQ)
        h = hashlib.sha256()
        for a in (self.char_table, self.splice_tokens, self.splice_len):
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        h.update(f"{self.max_abs},{self.max_depth},{self.limit},{self.separators!r}".encode())
        self._key = h.hexdigest()

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        vocab_size: Optional[int] = None,
        *,
        term_ids: Sequence[int] = (),
        separators: str = DEFAULT_SEPARATORS,
        max_abs: int = DEFAULT_MAX_ABS,
        max_depth: int = MAX_DEPTH,
        width: int = 4,
    ) -> "CalculatorTool":
        """Lookup tables from ``tokenizer`` (``encode(text)``/``decode(ids)``).

        Args:
          vocab_size: the model's vocabulary (>= the tokenizer's); extra ids read as OTHER.
          term_ids: the policy's termination ids; raises if a spliced token is one of them.
          separators: characters that start a new expression (``,`` and ``.``, as the
            release, which also starts one after ``Answer:``, i.e. at the start of Z).
          max_abs: values with a larger magnitude are not spliced (the malformed fallback).
          width: character-class slots per token; longer tokens are truncated
            (see :func:`_token_repr`; with SmolLM2's vocabulary no token that can appear in
            a well-formed expression is).

        Each token id is decoded on its own, so the tokenizer's single-token decoding must be
        faithful (byte-level BPE and character tokenizers are; checked on a sample).
        """
        if width < 3:
            raise ValueError(f"width must be >= 3, got {width}")
        if not separators or any(c in "0123456789+-*() =" for c in separators):
            raise ValueError(f"separators {separators!r} must be non-empty and not grammar characters")
        tv = int(tokenizer.vocab_size)
        V = tv if vocab_size is None else int(vocab_size)
        if V < tv:
            raise ValueError(f"vocab_size {V} is smaller than the tokenizer's {tv}")
        for sample in ("Question: 6 - 0 - 4 = ? Answer: 6 - 0 = 6, -4 * (3 + 12) = -60.",
                       "6 - 0 = 6, -4 * (3 + 12) = -60.", "6 - 0 = 6, 2 - 8 = -6"):
            try:
                ids = _encode_batch(tokenizer, [sample])[0]
            except Exception:  # characters the tokenizer cannot encode
                continue
            if "".join(tokenizer.decode([i]) for i in ids) != sample:
                raise ValueError(
                    "the calculator decodes token ids one at a time; this tokenizer's "
                    f"single-token decoding does not reproduce {sample!r}"
                )
        table = np.zeros((V, width), np.int8)
        table[:, 0] = C_OTHER
        truncated = 0
        for i in range(tv):
            r, cut = _token_repr(tokenizer.decode([i]), separators, width)
            truncated += cut
            table[i] = 0
            table[i, : len(r)] = r
        values = list(range(-max_abs, max_abs + 1))
        enc = _encode_batch(tokenizer, [splice_text(v) for v in values])
        M = max(len(e) for e in enc)
        splice = np.zeros((len(values), M), np.int32)
        slen = np.zeros((len(values),), np.int32)
        for r, e in enumerate(enc):
            splice[r, : len(e)] = e
            slen[r] = len(e)
        used = np.unique(splice[slen[:, None] > np.arange(M)[None, :]])
        bad_term = sorted(set(int(t) for t in term_ids) & set(used.tolist()))
        if bad_term:
            raise ValueError(f"spliced values would use termination ids {bad_term}")
        special = [int(u) for u in used
                   if np.isin(table[u], (C_EQ, C_SEP, C_OTHER, C_LPAR, C_RPAR)).any()]
        if special:
            raise ValueError(
                f"spliced values use tokens {special} that are not plain space/sign/digits"
            )
        return cls(table, splice, slen, max_abs=max_abs, max_depth=max_depth,
                   num_truncated=truncated, separators=separators)

    # --- hashing (jit static argument) ---------------------------------------------------
    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, CalculatorTool) and other._key == self._key

    def __repr__(self) -> str:
        return (f"CalculatorTool(vocab={self.char_table.shape[0]}, width={self.char_table.shape[1]}, "
                f"max_abs={self.max_abs}, key={self._key[:12]})")

    # --- host helpers --------------------------------------------------------------------
    def splice_ids(self, value: int) -> List[int]:
        """Token ids spliced for ``value`` ([] outside ``±max_abs``)."""
        if value is None or abs(int(value)) > self.max_abs:
            return []
        r = int(value) + self.max_abs
        return self.splice_tokens[r, : self.splice_len[r]].tolist()

    # --- the Tool protocol ---------------------------------------------------------------
    def __call__(self, tokens: jax.Array, lengths: jax.Array, t: Any) -> Tuple[jax.Array, jax.Array]:
        """``tokens [N, T]`` generated so far (valid below ``lengths [N]``) -> (force, token)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        lengths = jnp.asarray(lengths, jnp.int32)
        N, T = tokens.shape
        V, K = self.char_table.shape
        inside = jnp.arange(T)[None, :] < lengths[:, None]  # [N, T]
        ids = jnp.clip(tokens, 0, V - 1)
        chars = jnp.where(inside[..., None], jnp.asarray(self.char_table)[ids], C_NONE)
        trig = inside & jnp.asarray(self.is_trigger)[ids]
        pos = jnp.arange(T)[None, :]
        j = jnp.max(jnp.where(trig, pos, -1), axis=1)  # last trigger, -1 if none
        jc = jnp.maximum(j, 0)
        p_eq = jc * K + jnp.asarray(self.last_offset)[ids[jnp.arange(N), jc]]  # its '='
        flat = chars.reshape(N, T * K).astype(jnp.int32)
        f = jnp.arange(T * K)[None, :]
        p_sep = jnp.max(jnp.where((flat == C_SEP) & (f < p_eq[:, None]), f, -1), axis=1)
        active = (f > p_sep[:, None]) & (f < p_eq[:, None]) & (flat != C_NONE)
        value, valid = _eval_scan(flat, active, self.limit, self.max_depth)
        valid = valid & (j >= 0) & (jnp.abs(value) <= self.max_abs)
        row = jnp.clip(value + self.max_abs, 0, 2 * self.max_abs)
        m = jnp.where(valid, jnp.asarray(self.splice_len)[row], 0)
        k = lengths - 1 - j
        force = (j >= 0) & (k < m)
        forced = jnp.asarray(self.splice_tokens)[row, jnp.clip(k, 0, self.splice_tokens.shape[1] - 1)]
        return force, jnp.where(force, forced, 0).astype(jnp.int32)


def _encode_batch(tokenizer: Any, texts: List[str]) -> List[List[int]]:
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    out = []
    for s in texts:
        try:
            out.append(list(tokenizer.encode(s, add_bos=False)))
        except TypeError:
            out.append(list(tokenizer.encode(s)))
    return out


def rationale_trajectory(
    tool: CalculatorTool, tokenizer: Any, rationale: str
) -> Tuple[List[int], List[bool]]:
    """The tool-on trajectory of a policy text written without results.

    ``rationale`` is what the policy writes, e.g. the data's ``"6 - 0 =, 6 - 4 =, 2 - 8 ="``;
    after each ``=`` the calculator's splice is inserted. Returns ``(tokens, action_mask)``
    (False at spliced tokens), e.g. to seed a replay buffer with ground-truth rationales.
    Each policy piece (text up to and including an ``=``) is encoded on its own, as the policy
    would have written it token by token.
    """
    tokens: List[int] = []
    mask: List[bool] = []
    pieces = rationale.split("=")
    for n, piece in enumerate(pieces):
        last = n == len(pieces) - 1
        text = piece if last else piece + "="
        if not text:
            continue
        ids = _encode_batch(tokenizer, [text])[0]
        tokens += ids
        mask += [True] * len(ids)
        if not last:
            ctx = tokenizer.decode(tokens)
            seg = ctx[: len(ctx) - 1]
            cut = max(seg.rfind(s) for s in tool.separators)
            sp = tool.splice_ids(evaluate_expression(seg[cut + 1 :]))
            tokens += sp
            mask += [False] * len(sp)
    return tokens, mask
