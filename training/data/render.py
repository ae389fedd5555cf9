"""Renderings of a KTAS record as a triage note: `shorthand`, `narrative` (English), `ko` (Korean ED-note style).

These are the real KTAS records (Moon et al., PLOS ONE 2019, CC BY 4.0) written out in different styles by
code: they are NOT real free text. Every rendering is built only from the record's triage-time fields
(`TRIAGE_COLUMNS`) and carries the same facts as `shorthand`; post-triage fields never enter it. Phrasing is
drawn from a `random.Random` seeded by a stable hash of (seed, row id, style, epoch), so nothing about the
label or any other field chooses the words, and a record renders the same way every time.

Facts that `narrative` and `ko` may leave out at random (`OMIT_PROBABILITY`), as a nurse leaves out what is
unremarkable — and only when unremarkable: arrival on foot or by private vehicle, no injury, alert, and no pain
(without an NRS score). Always written when present: the chief complaint (when readable), age, sex, any other
arrival mode, injury, any other mental state, pain and its NRS score, and every vital sign.

`mixed` draws one of the three styles per record and per epoch (training augmentation); epoch 0 is the draw
that validation and test use, so model selection sees fixed notes.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from training.config import RENDER_STYLES, RenderStyle
from training.data.examples import DataError, Examples

FIXED_STYLES: tuple[RenderStyle, ...] = ("shorthand", "narrative", "ko")  # what `mixed` draws from

TRIAGE_COLUMNS = [
    "Sex",
    "Age",
    "Arrival mode",
    "Injury",
    "Chief_complain",
    "Mental",
    "Pain",
    "NRS_pain",
    "SBP",
    "DBP",
    "HR",
    "RR",
    "BT",
    "Saturation",
]
SEX = {"1": "F", "2": "M"}
ARRIVAL = {"1": "walk-in", "2": "public ambulance", "3": "private vehicle", "4": "private ambulance"}
INJURY = {"1": "no injury", "2": "injury"}
MENTAL = {"1": "alert", "2": "responds to voice", "3": "responds to pain", "4": "unresponsive"}
# Korean complaints were lost to "?" in the published file; a complaint with no letter left carries no text.
NO_LETTERS = re.compile(r"^[\W\d_]*$")

OMIT_PROBABILITY = 0.3
OPTIONAL_ARRIVALS = ("1", "3")  # walk-in, private vehicle

# ---------------------------------------------------------------------------------------------- complaints
# (abbreviation, expansion) as written in Korean ED charts; the frequent KTAS complaints use all of these.
ABBREVIATIONS: tuple[tuple[str, str], ...] = (
    ("abd", "abdominal"),
    ("Lt", "left"),
    ("Rt", "right"),
    ("ant", "anterior"),
    ("LBP", "low back pain"),
    ("SOB", "shortness of breath"),
    ("N/V", "nausea and vomiting"),
    ("HA", "headache"),
    ("DZ", "dizziness"),
    ("LOC", "loss of consciousness"),
    ("CP", "chest pain"),
    ("RUQ", "right upper quadrant"),
    ("RLQ", "right lower quadrant"),
    ("LUQ", "left upper quadrant"),
    ("LLQ", "left lower quadrant"),
    ("F/C", "fever/chills"),
    ("G/W", "general weakness"),
    ("FB", "foreign body"),
    ("lac", "laceration"),
    ("Fx", "fracture"),
    ("Sz", "seizure"),
    ("Sx", "symptoms"),
    ("CPR", "cardiopulmonary resuscitation"),
    ("AMS", "altered mental status"),
)
# Abbreviations written with a period at random ("Lt." / "Lt").
DOTTED = ("abd", "Lt", "Rt", "ant", "lac")
# "LBP - Low back pain", "H-Headache": an abbreviation and its expansion written together.
DASH_GLOSS = re.compile(r"^([A-Z][A-Za-z/]{0,3})\s*-\s*([A-Za-z].*)$")
# "pain, chest" / "ocular pain, Lt.": the chart's inverted order, written naturally ("chest pain") at random.
INVERTED = re.compile(r"^([^,]+),\s*([^,]+)$")
INVERTED_HEADS = ("pain", "injury", "burn", "discomfort", "distension", "swelling", "laceration", "bleeding")
DOUBLE_PERIOD = re.compile(r"(?<=\w)\.\.(?!\.)")  # "lac." + "." at a sentence end
SIDE = re.compile(r"^(Lt|Rt|left|right|both)\.?$", re.IGNORECASE)

_ABBREVIATION_OF = {a.lower(): a for a, _ in ABBREVIATIONS}
_EXPANSION_OF = {a.lower(): e for a, e in ABBREVIATIONS}
_ABBREVIATED_FROM = {e.lower(): a for a, e in ABBREVIATIONS}
_ABBREVIATION_PATTERN = re.compile(
    r"(?<![\w/])(" + "|".join(re.escape(a) for a in sorted(_EXPANSION_OF, key=len, reverse=True)) + r")\.?(?![\w/])",
    re.IGNORECASE,
)
_EXPANSION_PATTERN = re.compile(
    r"(?<![\w/])(" + "|".join(re.escape(e) for e in sorted(_ABBREVIATED_FROM, key=len, reverse=True)) + r")(?![\w/])",
    re.IGNORECASE,
)

# Korean glosses of complaint terms (matched on the expanded, lower-cased complaint; longest first).
KO_GLOSSES: tuple[tuple[str, str], ...] = (
    ("abdominal pain", "복통"),
    ("abdomen pain", "복통"),
    ("epigastric pain", "명치 통증"),
    ("chest pain", "흉통"),
    ("chest discomfort", "흉부 불편감"),
    ("low back pain", "요통"),
    ("flank pain", "옆구리 통증"),
    ("ocular pain", "안구 통증"),
    ("general weakness", "전신 쇠약감"),
    ("motor weakness", "근력 저하"),
    ("mental change", "의식 변화"),
    ("altered mentality", "의식 변화"),
    ("loss of consciousness", "의식 소실"),
    ("vaginal bleeding", "질 출혈"),
    ("open wound", "열린 상처"),
    ("sore throat", "인후통"),
    ("sorethroat", "인후통"),
    ("throat pain", "인후통"),
    ("dyspnea", "호흡곤란"),
    ("dizziness", "어지러움"),
    ("vertigo", "현훈"),
    ("fever", "발열"),
    ("headache", "두통"),
    ("vomiting", "구토"),
    ("nausea", "오심"),
    ("hematemesis", "토혈"),
    ("hematochezia", "혈변"),
    ("melena", "흑색변"),
    ("syncope", "실신"),
    ("dysarthria", "구음장애"),
    ("palpitation", "두근거림"),
    ("seizure", "경련"),
    ("convulsion", "경련"),
    ("epistaxis", "코피"),
    ("cough", "기침"),
    ("diarrhea", "설사"),
    ("dysuria", "배뇨통"),
    ("hematuria", "혈뇨"),
    ("hemoptysis", "객혈"),
    ("urticaria", "두드러기"),
    ("rash", "발진"),
    ("laceration", "열상"),
    ("myalgia", "근육통"),
    ("anxiety", "불안"),
)


def readable_complaint(raw: str) -> str:
    """The complaint with whitespace collapsed; '' when it has no letter (lost Korean '?' runs, empty)."""
    complaint = " ".join(str(raw or "").split())
    return "" if NO_LETTERS.match(complaint) else complaint


def expand_abbreviations(text: str) -> str:
    """Every abbreviation of `ABBREVIATIONS` in `text` replaced by its expansion ("Lt. abd pain" -> "left abdominal
    pain")."""
    return _ABBREVIATION_PATTERN.sub(lambda m: _EXPANSION_OF[m.group(1).lower()], text)


def abbreviate(text: str, rng: random.Random | None = None) -> str:
    """Every expansion of `ABBREVIATIONS` in `text` replaced by its abbreviation ("left abdominal pain" -> "Lt abd
    pain"); with `rng`, some abbreviations get a period ("Lt.")."""

    def short(match: re.Match[str]) -> str:
        abbreviation = _ABBREVIATED_FROM[match.group(1).lower()]
        dotted = abbreviation in DOTTED and rng is not None and rng.random() < 0.4
        return abbreviation + ("." if dotted else "")

    return _EXPANSION_PATTERN.sub(short, text)


def vary_complaint(complaint: str, rng: random.Random) -> str:
    """The complaint as a writer might put it: as charted, with abbreviations expanded, or abbreviated; the
    inverted chart order ("pain, chest") written naturally at random. Every term keeps its meaning."""
    mode = rng.choice(("as written", "expanded", "abbreviated"))
    dash = DASH_GLOSS.match(complaint)
    if dash:
        short, long = dash.groups()
        if mode == "expanded" or (mode == "abbreviated" and short.lower() not in _ABBREVIATION_OF):
            complaint = long
        elif mode == "abbreviated":
            complaint = short
        return complaint
    inverted = INVERTED.match(complaint)
    if inverted and rng.random() < 0.6:
        head, modifier = (part.strip() for part in inverted.groups())
        if SIDE.match(modifier) or head.lower() in INVERTED_HEADS:
            complaint = f"{modifier} {head[0].lower() + head[1:] if not head.isupper() else head}"
    if mode == "expanded":
        return expand_abbreviations(complaint)
    if mode == "abbreviated":
        return abbreviate(complaint, rng)
    return complaint


def korean_gloss(complaint: str) -> str | None:
    """A Korean gloss of the complaint's main term, or None."""
    expanded = expand_abbreviations(complaint).lower()
    for term, gloss in KO_GLOSSES:
        if term in expanded:
            return gloss
    return None


# ---------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Facts:
    """The triage-time fields of one record, stripped ('' when missing)."""

    complaint: str
    age: str
    sex: str  # "F", "M" or ""
    arrival: str  # the raw code
    injury: str
    mental: str
    pain: str
    nrs: str
    sbp: str
    dbp: str
    hr: str
    rr: str
    bt: str
    spo2: str

    @classmethod
    def of(cls, record: Mapping[str, object]) -> Facts:
        get = {k: str(record.get(k, "") or "").strip() for k in TRIAGE_COLUMNS}
        return cls(
            complaint=readable_complaint(get["Chief_complain"]),
            age=get["Age"],
            sex=SEX.get(get["Sex"], ""),
            arrival=get["Arrival mode"],
            injury=get["Injury"],
            mental=get["Mental"],
            pain=get["Pain"],
            nrs=get["NRS_pain"],
            sbp=get["SBP"],
            dbp=get["DBP"],
            hr=get["HR"],
            rr=get["RR"],
            bt=get["BT"],
            spo2=get["Saturation"],
        )


def _keep(optional: bool, rng: random.Random) -> bool:
    """Always draws, so the phrasing of later facts does not depend on whether an earlier one was optional."""
    draw = rng.random()
    return not optional or draw >= OMIT_PROBABILITY


# ---------------------------------------------------------------------------------------------- shorthand


def shorthand_note(record: Mapping[str, object]) -> str:
    """`CC: abd pain. 71M, private vehicle, injury, alert, NRS 2, BP 160/100, HR 84, RR 18, BT 36.6, SpO2 100`."""
    f = Facts.of(record)
    facts = []
    if f.age or f.sex:
        facts.append(f"{f.age}{f.sex}")
    if f.arrival:
        facts.append(ARRIVAL.get(f.arrival, "other arrival"))
    facts += [table[code] for code, table in ((f.injury, INJURY), (f.mental, MENTAL)) if code in table]
    if f.nrs:
        facts.append(f"NRS {f.nrs}")
    elif f.pain == "0":
        facts.append("no pain")
    elif f.pain == "1":
        facts.append("pain")
    if f.sbp and f.dbp:
        facts.append(f"BP {f.sbp}/{f.dbp}")
    elif f.sbp:
        facts.append(f"SBP {f.sbp}")
    facts += [
        f"{name} {value}" for name, value in (("HR", f.hr), ("RR", f.rr), ("BT", f.bt), ("SpO2", f.spo2)) if value
    ]
    head = f"CC: {f.complaint}. " if f.complaint else ""
    return head + ", ".join(facts)


# ---------------------------------------------------------------------------------------------- narrative (English)

EN_MALE = ("man", "male", "gentleman")
EN_FEMALE = ("woman", "female", "lady")
EN_WHO = (  # {a}: "A"/"An", {age}, {sex}: a word of EN_MALE/EN_FEMALE, {MF}: M/F, {mf}: male/female
    "{a} {age}-year-old {sex}",
    "{age} y/o {MF}",
    "{age}yo {mf}",
    "{age}{MF}",
    "{age} y.o. {mf}",
    "Pt is {a_lower} {age}-year-old {sex}",
    "{age}-year-old {mf} patient",
)
EN_OPENINGS = (  # {who}, {cc}
    "{who} presenting with {cc}.",
    "{who} c/o {cc}.",
    "{who} complaining of {cc}.",
    "{who} who comes to the ED with {cc}.",
    "CC: {cc}. {who}.",
    "{who}, here for {cc}.",
    "Chief complaint: {cc}. {who}.",
    "{who} presents to the ER with {cc}.",
)
EN_OPENINGS_NO_CC = ("{who} presenting to the ED.", "{who} seen at triage.", "{who} presents to the ER.")
EN_ARRIVAL = {
    "1": ("Walked in.", "Arrived on foot.", "Walk-in.", "Came to the ED on foot."),
    "2": (
        "Brought in by 119 ambulance.",
        "Arrived via EMS (119).",
        "BIBA, public 119 ambulance.",
        "Arrived by public ambulance.",
    ),
    "3": ("Arrived by private vehicle.", "Came in by private car.", "POV arrival.", "Came by car."),
    "4": ("Arrived by private ambulance.", "Brought in by private ambulance.", "Private ambulance arrival."),
    "other": ("Other mode of arrival.", "Arrival mode: other."),
}
EN_INJURY = {
    "1": ("No trauma.", "Non-traumatic.", "No injury reported.", "Trauma (-)."),
    "2": ("Trauma-related visit.", "Injury involved.", "Traumatic mechanism.", "Trauma (+)."),
}
EN_MENTAL = {
    "1": ("Alert.", "Alert on arrival.", "Mental status alert.", "AVPU: A."),
    "2": ("Responds to voice.", "Responds to verbal stimuli.", "AVPU: V."),
    "3": ("Responds only to pain.", "Responds to painful stimuli only.", "AVPU: P."),
    "4": ("Unresponsive.", "No response to stimuli.", "AVPU: U."),
}
EN_NRS = ("Pain NRS {n}.", "Pain score {n}/10.", "Rates pain {n}/10.", "NRS {n}.", "Pain {n} out of 10 on NRS.")
EN_PAIN = {
    "1": ("Reports pain.", "Pain (+).", "Complains of pain, not scored."),
    "0": ("No pain.", "Denies pain.", "Pain (-)."),
}
# Vital-sign labels, short and spelled out; units written or not.
EN_LABELS = {
    "bp": (("BP",), ("blood pressure",)),
    "hr": (("HR", "PR", "P"), ("heart rate", "pulse")),
    "rr": (("RR", "R"), ("respiratory rate", "resp rate", "respirations")),
    "bt": (("BT", "T", "Temp"), ("temperature", "body temperature")),
    "spo2": (("SpO2", "O2 sat", "sat"), ("oxygen saturation", "saturation")),
}
EN_UNITS = {"bp": (" mmHg",), "hr": (" bpm", "/min"), "rr": ("/min",), "bt": (" C", "°C", " ℃"), "spo2": ("%",)}
EN_VITALS_INTROS = ("Vitals: ", "V/S: ", "Initial vitals ", "VS ", "Vital signs: ", "On arrival ", "")


def _en_who(f: Facts, rng: random.Random) -> str:
    template = rng.choice(EN_WHO)
    a = "An" if f.age.startswith("8") or f.age in ("11", "18") else "A"
    words = EN_MALE if f.sex == "M" else EN_FEMALE if f.sex == "F" else ("patient",)
    return template.format(
        a=a,
        a_lower=a.lower(),
        age=f.age,
        sex=rng.choice(words),
        MF=f.sex,
        mf={"M": "male", "F": "female"}.get(f.sex, ""),
    ).replace("  ", " ")


def _vital_items(f: Facts, labels: Mapping, units: Mapping, rng: random.Random, spelled: bool) -> list[str]:
    def label(key: str) -> str:
        return rng.choice(labels[key][1 if spelled else 0])

    def unit(key: str) -> str:
        return rng.choice(units[key]) if rng.random() < 0.5 else ""

    items = []
    if f.sbp and f.dbp:
        items.append(f"{label('bp')} {f.sbp}/{f.dbp}{unit('bp')}")
    elif f.sbp:
        items.append(f"{'systolic ' if spelled else 'S'}{label('bp')} {f.sbp}{unit('bp')}")
    for key, value in (("hr", f.hr), ("rr", f.rr), ("bt", f.bt)):
        if value:
            items.append(f"{label(key)} {value}{unit(key)}")
    if f.spo2:
        items.append(f"{label('spo2')} {f.spo2}%")
    return items


def _compact_vitals(f: Facts) -> str | None:
    """`160/100-84-18-36.6` when all four are known (the V/S shorthand of Korean charts)."""
    return f"{f.sbp}/{f.dbp}-{f.hr}-{f.rr}-{f.bt}" if all((f.sbp, f.dbp, f.hr, f.rr, f.bt)) else None


def _en_vitals(f: Facts, rng: random.Random) -> str | None:
    compact = _compact_vitals(f)
    if compact and rng.random() < 0.25:
        return f"V/S {compact}" + (f", SpO2 {f.spo2}%." if f.spo2 else ".")
    items = _vital_items(f, EN_LABELS, EN_UNITS, rng, spelled=rng.random() < 0.35)
    if not items:
        return None
    intro = rng.choice(EN_VITALS_INTROS)
    text = intro + rng.choice((", ", "; ", ", ")).join(items) + "."
    return text[0].upper() + text[1:]


def narrative_note(record: Mapping[str, object], rng: random.Random) -> str:
    """A few English sentences as a triage nurse or physician writes them."""
    f = Facts.of(record)
    who = _en_who(f, rng)
    if f.complaint:
        opening = rng.choice(EN_OPENINGS).format(who=who, cc=vary_complaint(f.complaint, rng))
    else:
        opening = rng.choice(EN_OPENINGS_NO_CC).format(who=who)
    middle = []
    if f.arrival and _keep(f.arrival in OPTIONAL_ARRIVALS, rng):
        middle.append(rng.choice(EN_ARRIVAL.get(f.arrival, EN_ARRIVAL["other"])))
    if f.injury in EN_INJURY and _keep(f.injury == "1", rng):
        middle.append(rng.choice(EN_INJURY[f.injury]))
    if f.mental in EN_MENTAL and _keep(f.mental == "1", rng):
        middle.append(rng.choice(EN_MENTAL[f.mental]))
    if f.nrs:
        middle.append(rng.choice(EN_NRS).format(n=f.nrs))
    elif f.pain in EN_PAIN and _keep(f.pain == "0", rng):
        middle.append(rng.choice(EN_PAIN[f.pain]))
    rng.shuffle(middle)
    vitals = _en_vitals(f, rng)
    if vitals:
        middle.insert(len(middle) if rng.random() < 0.7 else rng.randrange(len(middle) + 1), vitals)
    return DOUBLE_PERIOD.sub(".", " ".join([opening[0].upper() + opening[1:], *middle]))


# ---------------------------------------------------------------------------------------------- ko (Korean ED note)

KO_MALE = ("남자", "남성", "남환")
KO_FEMALE = ("여자", "여성", "여환")
KO_WHO = ("{age}세 {sex}", "{MF}/{age}", "{age}/{MF}", "{sex} {age}세", "{age}세 {sex} 환자")  # {sex}: KO_MALE...
KO_ARRIVAL = {  # how the patient came; a verb ending follows
    "1": ("도보로", "걸어서", "walk-in으로"),
    "2": ("119 구급차로", "119 통해", "119 이용하여", "119 구급차 타고"),
    "3": ("자가용으로", "자차로", "개인 차량으로", "private car로"),
    "4": ("사설 구급차로", "사설 앰뷸런스로", "사설 구급차 이용하여"),
    "other": ("기타 경로로",),
}
KO_VISIT = ("내원", "내원함", "내원하였음", "내원하심", "ER 내원")
KO_COMPLAINT = ("{cc} 호소", "{cc} 호소하여", "{cc} 주소로", "C/C: {cc}", "{cc} 있어", "{cc} 증상으로", "{cc} 주소")
KO_INJURY = {
    "1": ("외상 없음", "외상 (-)", "비외상", "trauma (-)"),
    "2": ("외상 있음", "외상 (+)", "외상력 있음", "trauma (+)"),
}
KO_MENTAL = {
    "1": ("의식 명료", "의식 alert", "mental alert", "alert함", "의식 A"),
    "2": ("의식 verbal", "verbal response 보임", "언어 자극에 반응", "mental V"),
    "3": ("의식 pain", "통증 자극에만 반응", "mental P", "pain response만 있음"),
    "4": ("의식 unresponsive", "무반응", "자극에 반응 없음", "mental U"),
}
KO_NRS = ("NRS {n}점", "NRS {n}", "통증 NRS {n}/10", "pain NRS {n}점", "통증 점수 {n}점")
KO_PAIN = {"1": ("통증 있음", "통증 (+)", "pain (+)"), "0": ("통증 없음", "통증 (-)", "pain (-)", "통증 호소 없음")}
KO_LABELS = {
    "bp": (("BP",), ("혈압",)),
    "hr": (("PR", "HR", "P"), ("맥박", "심박수")),
    "rr": (("RR", "R"), ("호흡", "호흡수")),
    "bt": (("BT", "T"), ("체온",)),
    "spo2": (("SpO2",), ("산소포화도",)),
}
KO_UNITS = {"bp": ("mmHg",), "hr": ("회", "회/분", "bpm"), "rr": ("회", "회/분"), "bt": ("도", "℃"), "spo2": ("%",)}
KO_VITALS_INTROS = ("V/S ", "V/S: ", "활력징후 ", "")
KO_SEPARATORS = (". ", ", ", " / ", "\n")


def _ko_complaint(f: Facts, rng: random.Random) -> str:
    """The English complaint kept in Latin script, sometimes with a Korean gloss."""
    gloss = korean_gloss(f.complaint)
    if gloss and rng.random() < 0.4:
        return rng.choice(("{cc}({g})", "{cc} ({g})", "{g}({cc})")).format(cc=f.complaint, g=gloss)
    return f.complaint


def _ko_vitals(f: Facts, rng: random.Random) -> str | None:
    compact = _compact_vitals(f)
    if compact and rng.random() < 0.4:
        return f"{rng.choice(('V/S ', 'V/S: ', 'VS '))}{compact}" + (f", SpO2 {f.spo2}%" if f.spo2 else "")
    items = _vital_items(f, KO_LABELS, KO_UNITS, rng, spelled=rng.random() < 0.3)
    return rng.choice(KO_VITALS_INTROS) + ", ".join(items) if items else None


def ko_note(record: Mapping[str, object], rng: random.Random) -> str:
    """Korean ED-note style, English medical terms in Latin script: `71세 남자, 자가용으로 내원. abd pain 호소`."""
    f = Facts.of(record)
    words = KO_MALE if f.sex == "M" else KO_FEMALE if f.sex == "F" else ("환자",)
    who = rng.choice(KO_WHO).format(age=f.age, sex=rng.choice(words), MF=f.sex or "?").replace("환 환자", "환")
    arrival = ""
    if f.arrival and _keep(f.arrival in OPTIONAL_ARRIVALS, rng):
        arrival = rng.choice(KO_ARRIVAL.get(f.arrival, KO_ARRIVAL["other"])) + " "
    visit = rng.choice(KO_VISIT)
    cc = _ko_complaint(f, rng) if f.complaint else ""
    shape = rng.randrange(3)
    if cc and shape == 0:  # 71세 남자, 자가용으로 내원. abd pain 호소
        head = [f"{who}, {arrival}{visit}", rng.choice(KO_COMPLAINT).format(cc=cc)]
    elif cc and shape == 1:  # 71세 남자 abd pain 호소하여 자가용으로 내원함
        head = [f"{who} {cc} {rng.choice(('호소하여', '주소로', '있어', '증상으로'))} {arrival}{visit}"]
    elif cc:  # C/C: abd pain / M/71 자가용으로 내원
        head = [f"C/C: {cc}", f"{who} {arrival}{visit}"]
    else:
        head = [f"{who}, {arrival}{visit}" if rng.random() < 0.5 else f"{who} {arrival}{visit}"]
    middle = []
    if f.nrs:
        middle.append(rng.choice(KO_NRS).format(n=f.nrs))
    elif f.pain in KO_PAIN and _keep(f.pain == "0", rng):
        middle.append(rng.choice(KO_PAIN[f.pain]))
    if f.injury in KO_INJURY and _keep(f.injury == "1", rng):
        middle.append(rng.choice(KO_INJURY[f.injury]))
    if f.mental in KO_MENTAL and _keep(f.mental == "1", rng):
        middle.append(rng.choice(KO_MENTAL[f.mental]))
    rng.shuffle(middle)
    vitals = _ko_vitals(f, rng)
    separator = rng.choice(KO_SEPARATORS)
    return separator.join([*head, *middle, *([vitals] if vitals else [])])


# ---------------------------------------------------------------------------------------------- seeding and styles

STYLE_WRITERS: dict[str, Callable[[Mapping[str, object], random.Random], str]] = {
    "shorthand": lambda record, rng: shorthand_note(record),
    "narrative": narrative_note,
    "ko": ko_note,
}


def seeded_rng(seed: int, row_id: int, style: str, epoch: int = 0) -> random.Random:
    """A generator seeded by a stable hash of (seed, row id, style, epoch) (not Python's salted hash())."""
    key = f"{int(seed)}\x1f{int(row_id)}\x1f{style}\x1f{int(epoch)}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def mixed_style(seed: int, row_id: int, epoch: int) -> RenderStyle:
    """The style `mixed` draws for a record in an epoch."""
    return seeded_rng(seed, row_id, "mixed", epoch).choice(FIXED_STYLES)


def render_note(record: Mapping[str, object], style: RenderStyle, seed: int, row_id: int, epoch: int = 0) -> str:
    """The note of one record in `style`. Fixed styles ignore `epoch`; `mixed` draws a style per epoch and renders
    it with that epoch's phrasing (at epoch 0: exactly the fixed style's note)."""
    if style == "mixed":
        drawn = mixed_style(seed, row_id, epoch)
        return STYLE_WRITERS[drawn](record, seeded_rng(seed, row_id, drawn, epoch))
    if style not in STYLE_WRITERS:
        raise ValueError(f"unknown rendering {style!r}; one of {', '.join(RENDER_STYLES)}")
    return STYLE_WRITERS[style](record, seeded_rng(seed, row_id, style, 0))


@dataclass(frozen=True)
class Rendering:
    """How the texts of a set of KTAS examples are made from their records (shared by all subsets)."""

    records: Mapping[int, Mapping[str, object]]  # row id -> triage-time fields (TRIAGE_COLUMNS only)
    style: RenderStyle = "shorthand"
    seed: int = 0

    @property
    def per_epoch(self) -> bool:
        return self.style == "mixed"

    def texts(self, row_ids: Sequence[int] | np.ndarray, epoch: int = 0) -> list[str]:
        return [render_note(self.records[int(r)], self.style, self.seed, int(r), epoch) for r in row_ids]


def render_examples(examples: Examples, style: RenderStyle, seed: int = 0) -> Examples:
    """`examples` with texts rendered in `style` (for `mixed`: the epoch-0 draw; `Examples.for_epoch` re-draws)."""
    if examples.rendering is None:
        raise DataError(f"{examples.source}: --render needs KTAS records (--data ktas or --data-format ktas)")
    rendering = replace(examples.rendering, style=style, seed=seed)
    return replace(examples, texts=rendering.texts(examples.row_ids), rendering=rendering)


def calibration_examples(valid: Examples) -> Examples:
    """The notes that calibration and the decision threshold are fitted on: the validation split as it is, or,
    for `mixed`, every validation record in every style. A `mixed` model serves all three styles, so its
    probabilities and threshold should hold on each; the epoch-0 draw shows each record in one style only."""
    if valid.rendering is None or not valid.rendering.per_epoch:
        return valid
    styles = [render_examples(valid, style, valid.rendering.seed) for style in FIXED_STYLES]
    return replace(
        valid,
        texts=[text for part in styles for text in part.texts],
        labels=np.concatenate([part.labels for part in styles]),
        row_ids=np.concatenate([part.row_ids for part in styles]),
    )
