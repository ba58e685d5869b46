-- wrk script for bench/bench.py, section 4 (end to charge): POST /appointments/{id}/end at a
-- steady rate, each id of a file once, and when each end was sent and answered.
--   wrk -t2 -c32 -d60s -s bench/bench_paced_end.lua -H 'Authorization: Bearer ...' URL -- ids.txt 2 200 records.txt
-- Arguments: the id file, the number of threads (-t), ends per second (all threads together),
-- the records file.
--
-- Open loop, as far as wrk allows (wrk2 is not packaged): each thread owns a fixed schedule, send
-- k at t0 + k / (rate / threads), the threads' schedules interleaved. delay() hands the next slot
-- of the schedule to whichever connection is free and holds it until then, so the sends do not
-- wait for earlier answers as long as a connection is free (32 connections for at most 500 ends
-- a second). A send can still be late when every connection is busy: each send records its
-- scheduled time next to its actual one, and bench.py reports the slip.
--
-- Records (bench.write_records), times from bench.now():
--   E <id> <scheduled> <sent>        one per end sent
--   R <id> <answered> <status>       one per answer; the id comes back in X-Request-ID
-- Each thread stops once it has every answer (bench.finish).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "bench_lib.lua")

local body = '{"end_date": "2020-12-01 15:00:00"}'
local ids, headers, interval, t0 = {}, nil, 0, 0
local claimed, sent, answered = 0, 0, 0
records = {}

function init(args)
    local threads = tonumber(args[2])
    local rate = tonumber(args[3])
    ids = bench.share(args[1], threads)
    out = args[4]
    headers = bench.headers({ ["Content-Type"] = "application/json" })
    interval = threads / rate
    -- A moment for every connection to open; thread k starts k/rate later, so that the threads'
    -- sends alternate instead of coming in pairs.
    t0 = bench.now() + 0.2 + index / rate
end

function delay()
    if claimed >= #ids then
        return 60000 -- nothing left to send: idle until this thread is stopped
    end
    local at = t0 + claimed * interval
    claimed = claimed + 1
    local ms = (at - bench.now()) * 1000
    return ms > 0 and math.floor(ms + 0.5) or 0
end

function request()
    if bench.verifying() then
        return wrk.format("POST", "/appointments/" .. ids[1] .. "/end", headers, body)
    end
    sent = sent + 1
    local id = ids[sent]
    records[#records + 1] = string.format("E %s %.6f %.6f", id, t0 + (sent - 1) * interval, bench.now())
    headers["X-Request-ID"] = id
    return wrk.format("POST", "/appointments/" .. id .. "/end", headers, body)
end

function response(status, response_headers, response_body)
    local now = bench.now()
    answered = answered + 1
    records[#records + 1] = string.format("R %s %.6f %d", bench.header(response_headers, "X-Request-ID") or "-", now, status)
    if answered >= #ids then
        bench.finish()
    end
end

bench.report_with_records()
