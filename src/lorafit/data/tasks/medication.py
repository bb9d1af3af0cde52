"""Medication extraction: short synthetic clinical notes in, compact JSON of each medication out.

The answer's route and frequency come from small fixed vocabularies, while the notes write them the way clinicians
do ("PO", "by mouth", "SQ", "BID", "QHS", "q4-6h prn"): what the model has to learn is the JSON format and that
normalisation, while ignoring the vitals, history and plan around the medications. Test notes use the same drug
list as train (the test is of format and normalisation, not of unseen vocabulary), but new combinations of drugs,
doses, writings and sentence templates.

Notes are kept to about 10-45 words because the demo trains a 135M model on a 2-core CPU at ~70 tokens/s.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lorafit.data.tasks import chat_record, write_splits

SYSTEM_PROMPT = "Extract medication information from clinical notes. Return valid JSON only."

ROUTE_WRITINGS = {
    "oral": ("PO", "PO", "by mouth", "orally", "p.o."),
    "intravenous": ("IV", "IV", "intravenously", "IV push"),
    "intramuscular": ("IM", "IM", "intramuscularly"),
    "subcutaneous": ("SC", "subcut", "SQ", "subcutaneously"),
    "inhaled": ("inhaled", "via inhaler", "by inhalation"),
    "topical": ("topically", "topical", "applied to skin"),
}
FREQUENCY_WRITINGS = {
    "once daily": ("daily", "daily", "QD", "once a day", "once daily", "qday"),
    "twice daily": ("BID", "BID", "twice a day", "twice daily", "b.i.d."),
    "three times daily": ("TID", "TID", "three times a day", "t.i.d."),
    "four times daily": ("QID", "four times a day", "q.i.d."),
    "every 8 hours": ("q8h", "every 8 hrs", "every 8 hours", "q8 hours"),
    "every 12 hours": ("q12h", "every 12 hrs", "every 12 hours"),
    "at bedtime": ("QHS", "qhs", "at bedtime", "at night", "nightly"),
    "as needed": ("PRN", "prn", "as needed", "q4-6h prn", "q6h PRN"),
}
ROUTES = tuple(ROUTE_WRITINGS)
FREQUENCIES = tuple(FREQUENCY_WRITINGS)


@dataclass(frozen=True)
class Drug:
    name: str
    doses: tuple[str, ...]
    routes: tuple[str, ...]
    frequencies: tuple[str, ...]
    prn_for: tuple[str, ...] = ()  # reasons a note may give after PRN ("PRN pain"): more text not to extract


def _drug(name: str, doses: str, routes: str, frequencies: str, prn_for: str = "") -> Drug:
    """A table row from '|'-separated fields, which keeps the table below one drug per line."""
    def split(text: str) -> tuple[str, ...]:
        return tuple(text.split("|")) if text else ()

    return Drug(name, split(doses), split(routes), split(frequencies), split(prn_for))


DRUGS = (
    _drug("lisinopril", "5 mg|10 mg|20 mg|40 mg", "oral", "once daily"),
    _drug("metformin", "500 mg|850 mg|1000 mg", "oral", "once daily|twice daily"),
    _drug("atorvastatin", "10 mg|20 mg|40 mg|80 mg", "oral", "once daily|at bedtime"),
    _drug("amlodipine", "2.5 mg|5 mg|10 mg", "oral", "once daily"),
    _drug("metoprolol", "12.5 mg|25 mg|50 mg|100 mg", "oral", "once daily|twice daily"),
    _drug("losartan", "25 mg|50 mg|100 mg", "oral", "once daily"),
    _drug("hydrochlorothiazide", "12.5 mg|25 mg", "oral", "once daily"),
    _drug("furosemide", "20 mg|40 mg|80 mg", "oral|intravenous", "once daily|twice daily"),
    _drug("omeprazole", "20 mg|40 mg", "oral", "once daily|twice daily"),
    _drug("pantoprazole", "40 mg", "oral|intravenous", "once daily|twice daily"),
    _drug("levothyroxine", "25 mcg|50 mcg|75 mcg|100 mcg", "oral", "once daily"),
    _drug("sertraline", "25 mg|50 mg|100 mg", "oral", "once daily"),
    _drug("gabapentin", "100 mg|300 mg|600 mg", "oral", "three times daily|at bedtime"),
    _drug("amoxicillin", "500 mg|875 mg", "oral", "twice daily|three times daily|every 8 hours|every 12 hours"),
    _drug("azithromycin", "250 mg|500 mg", "oral|intravenous", "once daily"),
    _drug("cephalexin", "250 mg|500 mg", "oral", "twice daily|four times daily"),
    _drug("ciprofloxacin", "250 mg|500 mg|750 mg", "oral", "twice daily|every 12 hours"),
    _drug("warfarin", "1 mg|2 mg|5 mg|7.5 mg", "oral", "once daily|at bedtime"),
    _drug("apixaban", "2.5 mg|5 mg", "oral", "twice daily"),
    _drug("clopidogrel", "75 mg", "oral", "once daily"),
    _drug("aspirin", "81 mg|325 mg", "oral", "once daily"),
    _drug("prednisone", "5 mg|10 mg|20 mg|40 mg", "oral", "once daily"),
    _drug("trazodone", "25 mg|50 mg|100 mg", "oral", "at bedtime"),
    _drug("melatonin", "3 mg|5 mg", "oral", "at bedtime"),
    _drug("tamsulosin", "0.4 mg", "oral", "once daily|at bedtime"),
    _drug("donepezil", "5 mg|10 mg", "oral", "at bedtime"),
    _drug("potassium chloride", "10 mEq|20 mEq|40 mEq", "oral", "once daily|twice daily"),
    _drug("acetaminophen", "500 mg|650 mg|1 g", "oral|intravenous", "every 8 hours|as needed", "pain|fever"),
    _drug("ibuprofen", "400 mg|600 mg|800 mg", "oral", "three times daily|every 8 hours|as needed", "pain"),
    _drug("oxycodone", "5 mg|10 mg", "oral", "every 12 hours|as needed", "pain"),
    _drug("lorazepam", "0.5 mg|1 mg|2 mg", "oral|intravenous", "at bedtime|as needed", "anxiety"),
    _drug("ondansetron", "4 mg|8 mg", "oral|intravenous", "every 8 hours|as needed", "nausea"),
    _drug("morphine", "2 mg|4 mg", "intravenous", "as needed", "pain"),
    _drug("hydromorphone", "0.5 mg|1 mg", "intravenous", "as needed", "pain"),
    _drug("vancomycin", "750 mg|1 g|1.25 g|1.5 g", "intravenous", "every 8 hours|every 12 hours"),
    _drug("ceftriaxone", "1 g|2 g", "intravenous|intramuscular", "once daily"),
    _drug("piperacillin-tazobactam", "3.375 g|4.5 g", "intravenous", "every 8 hours"),
    _drug("methylprednisolone", "40 mg|125 mg", "intravenous", "once daily|every 12 hours"),
    _drug("ketorolac", "15 mg|30 mg", "intravenous|intramuscular", "every 8 hours|as needed", "pain"),
    _drug("haloperidol", "2 mg|5 mg", "intramuscular|oral", "twice daily|as needed", "agitation"),
    _drug("cyanocobalamin", "1000 mcg", "intramuscular", "once daily"),
    _drug("enoxaparin", "40 mg|60 mg|80 mg", "subcutaneous", "once daily|every 12 hours"),
    _drug("heparin", "5000 units", "subcutaneous", "every 8 hours|every 12 hours"),
    _drug("insulin glargine", "10 units|15 units|20 units|30 units", "subcutaneous", "once daily|at bedtime"),
    _drug("insulin lispro", "4 units|6 units|8 units", "subcutaneous", "three times daily"),
    _drug("albuterol", "2 puffs", "inhaled", "four times daily|as needed", "wheezing|SOB"),
    _drug("fluticasone", "1 puff|2 puffs", "inhaled", "twice daily"),
    _drug("tiotropium", "2 puffs", "inhaled", "once daily"),
    _drug("diclofenac", "2 g|4 g", "topical", "four times daily"),
    _drug("mupirocin", "1 application", "topical", "twice daily|three times daily"),
    _drug("lidocaine", "1 patch", "topical", "once daily"),
)

# Sentences that carry medications; "{}" is one medication or a joined list of them.
LEADS = (
    "Started {}.", "Continue {}.", "Home meds: {}.", "Discharged on {}.", "Will start {}.", "Currently on {}.",
    "Meds: {}.", "Resume {}.", "Plan: start {}.", "Given {} in ED.", "{}.", "Rx: {}.", "Takes {}.", "Ordered {}.",
    "Maintained on {}.", "Restarted {}.", "Pt reports taking {}.", "Add {}.",
)
# Context before and after the medications: history, vitals, labs and plan, none of which is to be extracted.
HISTORY = (
    "Pt is a {age} yo {sex} with {pmh}.", "{age}{sex} with {pmh} admitted for {problem}.",
    "{age} y/o {sex_word} with {pmh}, here for {problem}.", "Admitted with {problem}.",
    "Hx {pmh}. Presents with {problem}.", "Seen today for {problem}.", "{age}{sex}, PMH {pmh}.",
    "Follow-up visit for {pmh}.", "{age} yo {sex} presenting with {problem} x {days} days.",
)
FINDINGS = (
    "BP {sbp}/{dbp}, HR {hr}.", "Afebrile, SpO2 {spo2}% on RA.", "Follow up in {weeks} weeks.",
    "Recheck BMP in {days} days.", "Cr {cr}, K {k}.", "A1c {a1c}%.", "NKDA.", "Allergic to {allergy}.",
    "Will reassess in AM.", "Glucose {glucose} mg/dL this AM.", "Pain {pain}/10.", "Stable for discharge.",
)
CONDITIONS = ("HTN", "T2DM", "HLD", "CHF", "COPD", "asthma", "AFib", "CKD", "GERD", "hypothyroidism", "depression",
              "OA", "BPH", "dementia", "CAD")
PROBLEMS = ("cellulitis", "pneumonia", "UTI", "CHF exacerbation", "COPD exacerbation", "chest pain", "knee pain",
            "hyperglycemia", "back pain", "a fall", "syncope", "abdominal pain")
ALLERGIES = ("sulfa", "penicillin", "codeine", "latex", "iodine contrast")
MAX_WORDS = 45


def generate(n: int, seed: int) -> list[dict]:
    """`n` chat records (system, note, JSON answer), the same for the same seed."""
    rng = random.Random(seed)
    return [_record(rng) for _ in range(n)]


def write_demo_files(folder: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> tuple[Path, Path]:
    """medication_train.jsonl and medication_test.jsonl in `folder`; no test note appears in train."""
    return write_splits(generate, folder, "medication", n_train, n_test, seed)


def _record(rng: random.Random) -> dict:
    drugs = rng.sample(DRUGS, rng.choices((1, 2, 3), weights=(4, 4, 2))[0])
    written, answers = zip(*(_write_medication(rng, drug) for drug in drugs))
    note = _write_note(rng, list(written))
    answer = json.dumps({"medications": list(answers)})
    return chat_record(SYSTEM_PROMPT, note, answer)


def _write_medication(rng: random.Random, drug: Drug) -> tuple[str, dict]:
    """The medication as a note writes it, and as the answer states it (keys in the answer's order)."""
    dose, route, frequency = rng.choice(drug.doses), rng.choice(drug.routes), rng.choice(drug.frequencies)
    name = drug.name if rng.random() < 0.5 else drug.name[0].upper() + drug.name[1:]
    route_text = rng.choice(ROUTE_WRITINGS[route])
    frequency_text = rng.choice(FREQUENCY_WRITINGS[frequency])
    if frequency == "as needed" and drug.prn_for and rng.random() < 0.5:
        reason = rng.choice(drug.prn_for)
        frequency_text += f" for {reason}" if frequency_text.endswith("needed") else f" {reason}"
    elif rng.random() < 0.15:  # "metformin 500 mg BID PO": the order varies in real notes too
        route_text, frequency_text = frequency_text, route_text
    text = f"{name} {dose} {route_text} {frequency_text}"
    return text, {"name": drug.name, "dose": dose, "route": route, "frequency": frequency}


def _write_note(rng: random.Random, medications: list[str]) -> str:
    if len(medications) > 1 and rng.random() < 0.4:  # two sentences: "Continue A. Start B and C."
        cut = rng.randrange(1, len(medications))
        first, second = rng.sample(LEADS, 2)
        sentences = [_capitalise(first.format(_join(rng, medications[:cut]))),
                     _capitalise(second.format(_join(rng, medications[cut:])))]
    else:
        sentences = [_capitalise(rng.choice(LEADS).format(_join(rng, medications)))]
    sentences = [s.replace("..", ".") for s in sentences]  # "... b.i.d.." -> "... b.i.d."
    history = _fill(rng, rng.choice(HISTORY)) if rng.random() < 1.1 - 0.15 * len(medications) else ""
    finding = _fill(rng, rng.choice(FINDINGS)) if rng.random() < 0.9 - 0.2 * len(medications) else ""
    if finding and rng.random() < 0.3:
        sentences.insert(0, finding)  # vitals sometimes come before the medications, as in a SOAP note
        finding = ""
    note = " ".join(filter(None, [history, *sentences, finding]))
    # Drop context, never medications, until the note is short enough for the CPU demo.
    for extra in (finding, history):
        if len(note.split()) > MAX_WORDS and extra:
            note = note.replace(extra, "", 1).strip().replace("  ", " ")
    return note


def _join(rng: random.Random, items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    separator = rng.choice((", ", "; ", ", "))
    last = rng.choice((" and ", separator, ", and " if len(items) > 2 else " and ", " plus "))
    return separator.join(items[:-1]) + last + items[-1]


def _fill(rng: random.Random, template: str) -> str:
    sex = rng.choice("MF")
    pmh = rng.sample(CONDITIONS, rng.choice((1, 1, 2)))
    return template.format(
        age=rng.randrange(22, 95), sex=sex, sex_word="male" if sex == "M" else "female",
        pmh=" and ".join(pmh) if rng.random() < 0.5 else ", ".join(pmh), problem=rng.choice(PROBLEMS),
        days=rng.randrange(2, 8), weeks=rng.randrange(1, 7), sbp=rng.randrange(100, 180), dbp=rng.randrange(55, 105),
        hr=rng.randrange(52, 118), spo2=rng.randrange(89, 100), cr=f"{rng.uniform(0.6, 2.4):.1f}",
        k=f"{rng.uniform(3.1, 5.4):.1f}", a1c=f"{rng.uniform(5.6, 11.5):.1f}", allergy=rng.choice(ALLERGIES),
        glucose=rng.randrange(70, 320), pain=rng.randrange(2, 10),
    )


def _capitalise(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]
