"""The verl reward functions: correct from many threads at once (the authors' release scored some
correct answers 0 in threads: math-verify's SIGALRM timeout fails off the main thread), and loaded the
way verl loads them; the authors' rule reads the whole response, the strict one the assistant text."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from omegaconf import OmegaConf

from ctpo_cli.train.verl.reward import assistant_text, authors_score, strict_score

TOOL_TURN = "<tool_response>\n```output\n\\boxed{7}\n```\n</tool_response>"

# (response, ground truth, strict reward, authors' reward)
CASES = [
    ("The answer is \\boxed{025}.", "25", 1.0, 1.0),  # leading zero: 0 in the authors' threaded scorer
    ("So \\boxed{8.50}", "8.5", 1.0, 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0),
    ("First \\boxed{3}, finally \\boxed{5}", "5", 1.0, 1.0),  # the final box counts
    ("First \\boxed{5}, finally \\boxed{3}", "5", 0.0, 0.0),
    ("\\boxed{24}", "25", 0.0, 0.0),
    ("no boxed answer: 25", "25", 0.0, 1.0),  # math_verify reads the last number of the whole text
    ("Answer: 25", "25", 0.0, 1.0),  # math_dapo's Minerva format
    (f"```python\nprint(7)\n```\n{TOOL_TURN}\nSo \\boxed{{6}}", "6", 1.0, 1.0),
    (f"```python\nprint(7)\n```\n{TOOL_TURN}\nSo \\boxed{{6}}", "7", 0.0, 0.0),  # the final box wins
    (f"```python\nprint(7)\n```\n{TOOL_TURN}", "7", 0.0, 1.0),  # the tool's box counts for theirs
]


def test_tool_messages_are_not_part_of_the_answer() -> None:
    assert assistant_text(f"a {TOOL_TURN} b") == "a  b"
    assert assistant_text("a <tool_response>\ncut off") == "a "


def test_correct_from_many_threads_at_once() -> None:
    cases = CASES * 6
    with ThreadPoolExecutor(max_workers=12) as pool:
        strict = list(
            pool.map(lambda case: strict_score("math-ai/aime25", case[0], case[1], extra_info={}), cases)
        )
        authors = list(pool.map(lambda case: authors_score("math-ai/aime25", case[0], case[1]), cases))
    assert strict == [case[2] for case in cases]
    assert authors == [case[3] for case in cases]


def test_verl_loads_and_calls_it_as_configured() -> None:
    """verl's own loader with the experiment's setting, called as its naive reward manager calls it."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": "pkg://ctpo_cli.train.verl.reward",
                    "name": "strict_score",
                }
            }
        }
    )
    reward_fn = get_custom_reward_fn(config)
    assert reward_fn is not None
    assert reward_fn(data_source="x", solution_str="\\boxed{025}", ground_truth="25", extra_info={}) == 1.0
    assert reward_fn(data_source="x", solution_str="\\boxed{026}", ground_truth="25", extra_info={}) == 0.0
