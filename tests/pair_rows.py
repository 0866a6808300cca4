"""Two preference rows shared by the pair log-prob and reference tests."""

ROWS = [
    {
        "prompt": "Ana has 4 coins. Ana gets 9 more coins. How many coins does Ana have now?",
        "chosen": "4 + 9 = 13. The answer is 13.",
        "rejected": "4 + 9 = 12. The answer is 12.",
    },
    {
        "prompt": "Sam has 30 cards and gives 7 of them away. How many cards does Sam have left?",
        "chosen": "30 - 7 = 23. The answer is 23.",
        "rejected": "No.",
    },
]
