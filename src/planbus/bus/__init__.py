"""The bus: how a row in `plan_requests` becomes a claim, a plan call and one fenced write.

Here live the worker loop, the claim and its lease (heartbeat, sweep, hand-back), the effects
that end a claim, the progress writes, the provider's limits as the queue applies them, the
worker's metrics, and every statement they run (`queries`, `checks`). Modules here may import
`planbus.settings`, `planbus.errors`, `planbus.logs` and `planbus.llm`; never `planbus.ops`.
"""
