-- wrk script for bench/bench.py, section 5 (interference): POST /appointments (server-made ids)
-- for as long as bench.py lets it run (it sends SIGINT), with when each request was sent and
-- answered, so that bench.py can take the latencies of a window of the run (idle, then while a
-- backlog drains) instead of wrk's one figure for the whole run.
--   wrk -t2 -c16 -d3600s -s bench/bench_timed_start.lua -H 'Authorization: Bearer ...' URL -- records.txt
-- Each request carries X-Request-ID "<thread>-<n>", which the API sends back: that pairs an answer
-- with its request whatever connection it came on.
-- Records (bench.write_records), times from bench.now(): "<sent> <answered> <status>".
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "bench_lib.lua")

local body = '{"physician_id": "ea959b03-5577-45c9-b9f7-a45d3e77ce82", "patient_id": "86158d46-ce33-4e3d-9822-462bbff5782e"}'
local headers, sent_at, n = nil, {}, 0
records = {}

function init(args)
    out = args[1]
    headers = bench.headers({ ["Content-Type"] = "application/json" })
end

function request()
    if bench.verifying() then
        return wrk.format("POST", "/appointments", headers, body)
    end
    n = n + 1
    local request_id = index .. "-" .. n
    headers["X-Request-ID"] = request_id
    sent_at[request_id] = bench.now()
    return wrk.format("POST", "/appointments", headers, body)
end

function response(status, response_headers, response_body)
    local now = bench.now()
    local request_id = bench.header(response_headers, "X-Request-ID")
    local sent = request_id and sent_at[request_id]
    if sent then
        sent_at[request_id] = nil
        records[#records + 1] = string.format("%.6f %.6f %d", sent, now, status)
    end
end

bench.report_with_records()
