"""Intent classification: short synthetic banking support messages, each labelled with one of ten intents.

Some pairs are deliberately close, so that the confusion matrix has something to show: a card that has not
arrived (card_arrival) vs how long delivery takes (card_delivery_estimate); a transfer the recipient did not get
(transfer_not_received) vs one still pending (pending_transfer); a blocked PIN (pin_blocked) vs choosing a new
one (change_pin); a failed top-up vs a missing refund.
"""

from __future__ import annotations

import random
from pathlib import Path

from lorafit.data.tasks import chat_record, write_splits

LABELS = (
    "card_arrival", "card_delivery_estimate", "lost_or_stolen_card", "pin_blocked", "exchange_rate",
    "transfer_not_received", "pending_transfer", "top_up_failed", "refund_not_showing", "change_pin",
)
INSTRUCTION = "Classify the customer message into one intent. Answer with the intent label only."
SYSTEM_PROMPT = f"{INSTRUCTION}\nLabels: {', '.join(LABELS)}"

TEMPLATES = {
    "card_arrival": (
        "I ordered a new card {days} ago and it still hasn't arrived.", "My card hasn't come yet, it's been {days}.",
        "Still waiting for my card to show up in the post.", "Where is my new card? I ordered it {days} ago.",
        "Has my card actually been sent? Nothing has arrived so far.", "The card I requested never arrived.",
        "Can you track the card you posted to me? It's been {days}.", "No sign of my replacement card after {days}.",
    ),
    "card_delivery_estimate": (
        "How long does it take for a new card to arrive?", "If I order a card today, when will I get it?",
        "What's the usual delivery time for cards to {country}?", "How many days until a replacement card comes?",
        "Do you send cards to {country} and how long does it take?", "When should I expect a card if I order now?",
        "Roughly how long is card delivery?", "Is there express delivery for cards, and how fast is it?",
    ),
    "lost_or_stolen_card": (
        "I lost my card {when}, please block it.", "My wallet was stolen {when} with my card in it.",
        "Someone took my card {where}, what do I do?", "I can't find my card, I think I dropped it {where}.",
        "My card was stolen {when}. Freeze it please.", "I think my card got stolen, I need to cancel it.",
        "Left my card {where} and now it's gone.", "Lost my debit card {where}, can you stop it?",
    ),
    "pin_blocked": (
        "My PIN is blocked after I entered it wrong {times} times.", "I typed the wrong PIN too often and it's locked.",
        "The ATM says my PIN is blocked, how do I unblock it?", "My PIN got locked at the shop, can you unlock it?",
        "How do I unblock my PIN?", "Entered my PIN incorrectly {times} times and now it won't work.",
        "Card says PIN blocked {where}.", "Too many wrong PIN attempts, my card is locked.",
    ),
    "exchange_rate": (
        "What exchange rate do you use for {currency}?", "How much is {amount} in {currency} at your rate?",
        "Is your rate for {currency} the same as the market rate?", "Why was the rate I got for {currency} so bad?",
        "Do you add a markup on the {currency} exchange rate?", "Where can I see today's rate for {currency}?",
        "What rate will I get if I pay in {currency}?", "How do you work out the exchange rate?",
    ),
    "transfer_not_received": (
        "I sent {amount} to {person} but they say they haven't received it.",
        "{person_cap} still hasn't got the money I transferred {when}.",
        "My transfer shows as completed but the money never reached {person}.",
        "The payment I sent {when} hasn't arrived in the other account.",
        "Money left my account but {person} didn't get it.",
        "Transfer to {person} went through on my side but they have nothing.",
        "{person_cap} says my bank transfer never arrived.",
    ),
    "pending_transfer": (
        "My transfer to {person} has been pending since {when}.", "Why is my transfer still showing as pending?",
        "The {amount} I sent is stuck on pending.", "How long will my transfer stay pending?",
        "A transfer I made {when} still says pending, is that normal?",
        "My payment to {person} hasn't gone through yet, it's still processing.",
        "Transfer of {amount} is pending, when will it complete?",
    ),
    "top_up_failed": (
        "I tried to top up {amount} with {method} but it failed.", "My top-up was declined, why?",
        "Top up didn't work, I got an error.", "Why can't I add money with {method}? It keeps failing.",
        "Tried adding {amount} to my account and it was rejected.", "The top-up from {method} keeps getting declined.",
        "Couldn't top up {when}, it says payment failed.",
    ),
    "refund_not_showing": (
        "{merchant} refunded me {when} but I don't see it in my account.",
        "Where is my refund from {merchant}? It hasn't appeared.",
        "I was promised a refund of {amount} but it's not showing.",
        "The shop says they refunded me but my balance hasn't changed.",
        "Refund from {merchant} still missing after {days}.", "My refund for {amount} isn't in my account yet.",
        "{merchant} says the refund was sent {when}, where is it?",
    ),
    "change_pin": (
        "How do I change my PIN?", "I want to set a new PIN for my card.", "Can I change my PIN in the app?",
        "I'd like to change my card PIN to something easier to remember.", "Is it possible to change my PIN at an ATM?",
        "Where do I go to pick a new PIN?", "Can I choose a different PIN {when}?",
    ),
}
OPENERS = ("", "", "", "Hi, ", "Hello, ", "Hey, ", "Hi there. ", "Quick question: ", "Help! ")
CLOSERS = ("", "", "", " Thanks.", " Please help.", " Thank you!", " What should I do?", " Any ideas?")
SLOTS = {
    "days": ("a week", "10 days", "two weeks", "3 weeks", "over a month", "5 days"),
    "country": ("Spain", "Germany", "the US", "France", "Ireland", "Poland", "Australia"),
    "when": ("yesterday", "this morning", "last night", "on Monday", "two days ago", "last week"),
    "where": ("at the station", "on the bus", "in a taxi", "at a bar", "at the gym", "at the airport"),
    "times": ("3", "three", "several", "4"),
    "currency": ("euros", "dollars", "USD", "EUR", "yen", "Swiss francs", "pounds"),
    "amount": ("£50", "$200", "€30", "100 euros", "£1,000", "$45.99", "£20"),
    "person": ("my sister", "my landlord", "a friend", "my mum", "my colleague", "the seller"),
    "method": ("Apple Pay", "my debit card", "Google Pay", "a bank transfer", "my credit card"),
    "merchant": ("Amazon", "the hotel", "an online shop", "Uber", "the airline", "eBay"),
}


def generate(n: int, seed: int) -> list[dict]:
    """`n` chat records, labels as balanced as `n` allows and in shuffled order; the same for the same seed."""
    rng = random.Random(seed)
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    rng.shuffle(labels)
    return [chat_record(SYSTEM_PROMPT, _write_message(rng, label), label) for label in labels]


def write_task_files(folder: Path, n_train: int = 300, n_test: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """intents_train.jsonl and intents_test.jsonl in `folder`; no test message appears in train."""
    return write_splits(generate, folder, "intents", n_train, n_test, seed)


def _write_message(rng: random.Random, label: str) -> str:
    fills = {slot: rng.choice(values) for slot, values in SLOTS.items()}
    fills["person_cap"] = fills["person"][0].upper() + fills["person"][1:]
    body = rng.choice(TEMPLATES[label]).format(**fills)
    opener = rng.choice(OPENERS)
    if opener.endswith(", "):
        body = body[0].lower() + body[1:] if not body.startswith(("I ", "I'")) else body
    message = opener + body + rng.choice(CLOSERS)
    if rng.random() < 0.2:  # people type fast: all lower case, no final full stop
        message = message.lower().rstrip(".")
    return message
