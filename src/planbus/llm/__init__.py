"""The LLM side: planners, the plan and its rules, and everything about a model provider.

The planner protocol with its template and openai planners, the OpenAI protocol's streaming and
errors (`openai_*`), the pure pacing policy, what a plan cost, and the prompt. Nothing here
touches the database: modules here may import `planbus.settings` and `planbus.errors` only,
never `planbus.bus` or `planbus.ops`.
"""
