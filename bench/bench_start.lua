-- wrk script for bench/bench.py, sections 1, 2 and 10: POST /appointments (a new appointment per
-- request; the server makes its id), and bench_report.lua's result line at the end.
--   wrk -t2 -c16 -d4s -s bench/bench_start.lua -H 'Authorization: Bearer ...' http://127.0.0.1:8080/appointments
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"physician_id": "ea959b03-5577-45c9-b9f7-a45d3e77ce82", "patient_id": "86158d46-ce33-4e3d-9822-462bbff5782e"}'

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "bench_report.lua")
