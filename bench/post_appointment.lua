-- wrk script: POST /appointments with a fixed body (the server makes each appointment's id).
--   wrk -t2 -c16 -d10s -s bench/post_appointment.lua http://127.0.0.1:8080/appointments
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"physician_id": "ea959b03-5577-45c9-b9f7-a45d3e77ce82", "patient_id": "86158d46-ce33-4e3d-9822-462bbff5782e"}'
