//! Test kit: a scriptable OpenAI-compatible mock upstream that speaks real HTTP and SSE
//! (also behind `tollgate serve --demo`).
